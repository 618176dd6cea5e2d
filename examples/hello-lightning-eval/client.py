"""hello-lightning-eval's script: score the global model on this site's validation shard, once.

``flare.patch(trainer)`` makes ``trainer.validate()`` receive the job's model and send its metrics back.
"""

import argparse
import logging
import warnings

import lightning.pytorch as pl
from model import DigitsData, LitDigits

import fedbus.client.lightning as flare

warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()

    model = LitDigits()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    flare.patch(trainer)
    info = flare.system_info()
    data = DigitsData(info["site_index"], info["num_sites"], batch_size=args.batch_size)
    trainer.validate(model, datamodule=data, verbose=False)


if __name__ == "__main__":
    main()
