"""The evaluation script a NumpyCrossSiteEvalRecipe ships when it is given no ``eval_script``.

It runs at each site (never imported by fedbus itself): every evaluation task scores the received array
with FLARE's demo metric, ``accuracy = sum(x / max(x))``, without FLARE's random epsilon (a metric that
changes from run to run tells nothing). The recipe asks no site for a model of its own (this script has
none), and a training task is a job error.
"""

from __future__ import annotations

import numpy as np

import fedbus.client as flare
from fedbus.client.constants import NPConstants


def score(x: np.ndarray) -> float:
    peak = float(np.max(x)) if x.size else 0.0
    return float(np.sum(x / peak)) if peak else 0.0


def main() -> None:
    flare.init()
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if flare.is_evaluate():
            params = model.params or {}
            metrics = {"accuracy": score(np.asarray(params[NPConstants.NUMPY_KEY]))} if params else {}
            flare.send(flare.FLModel(metrics=metrics))
        else:
            raise RuntimeError("the built-in evaluator only evaluates: it has no model to train or submit")


if __name__ == "__main__":
    main()
