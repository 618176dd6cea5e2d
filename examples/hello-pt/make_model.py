"""Write job/model.safetensors: the initial global model of hello-pt, a seeded ``Net()``.

The file is committed; run this again only after changing ``Net``:  python examples/hello-pt/make_model.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fedbus.modelio import serde

JOB = Path(__file__).resolve().parent / "job"
sys.path.insert(0, str(JOB))

from net import Net  # noqa: E402  (lives in the job folder, which is the single source)


def main(seed: int = 0) -> Path:
    torch.manual_seed(seed)
    path = JOB / "model.safetensors"
    serde.write_file(path, serde.layout(Net().state_dict(), {"seed": str(seed)}))
    path.chmod(0o644)  # write_file makes a private 0600 temp file; the example is meant to be shared
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return path


if __name__ == "__main__":
    main()
