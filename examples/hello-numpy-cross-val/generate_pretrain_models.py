"""Write the two "pre-trained" server models the evaluation-only mode scores (``--model_dir``)."""

import argparse
from pathlib import Path

import numpy as np

SERVER_MODEL_DIR = "/tmp/fedbus/server_pretrain_models"


def generate(model_dir: str = SERVER_MODEL_DIR) -> Path:
    folder = Path(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    base = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    np.save(folder / "server_1.npy", base)
    np.save(folder / "server_2.npy", base * 2)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_dir", default=SERVER_MODEL_DIR)
    print("models written to", generate(parser.parse_args().model_dir))
