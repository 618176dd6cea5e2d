"""Train hello-lightning's LitDigits centrally for a few epochs and save it as a ``.pt`` checkpoint."""

import argparse
import logging
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hello-lightning"))
from model import DigitsData, LitDigits

CHECKPOINT = "/tmp/fedbus/pretrain_models/lit_digits.pt"

warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def generate(output: str = CHECKPOINT, epochs: int = 3) -> Path:
    torch.manual_seed(0)
    model = LitDigits()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, datamodule=DigitsData())
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default=CHECKPOINT)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print("checkpoint written to", generate(args.output, args.epochs))
