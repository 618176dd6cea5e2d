#!/usr/bin/env bash
# Install fedbus with its test and example extras. A torch that is already installed is kept (a GPU user
# installs their CUDA build first, see README); otherwise the CPU build 2.13.0 is pinned, so a fresh machine
# does not pull a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
# the experiment-tracking stores and the privacy accountants (opacus) too, so their tests run
"$PY" -m pip install -q -e ".[dev,examples,lightning,tensorboard,mlflow,wandb,privacy,he,secagg,ray]"
