"""hello-lightning, federated: an ordinary Lightning script plus ``flare.patch(trainer)`` and the round loop.

Each round the site validates the received global model on its local data (those metrics travel with the
result), then fits from it for ``--epochs`` epochs and sends the weights back with the number of steps.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning.pytorch as pl
from model import DigitsData, LitDigits

import fedbus.client.lightning as flare

warnings.filterwarnings("ignore", ".*does not have many workers.*")  # tiny in-memory data: no workers needed
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.2)
    args = parser.parse_args()

    model = LitDigits(lr=args.lr)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    flare.patch(trainer)  # connects to the site
    info = flare.system_info()
    data = DigitsData(info["site_index"], info["num_sites"])

    while flare.is_running():
        trainer.validate(model, datamodule=data, verbose=False)  # the global model, on local data
        trainer.fit(model, datamodule=data)  # trains from it, sends the result


if __name__ == "__main__":
    main()
