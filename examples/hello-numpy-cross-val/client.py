"""hello-numpy-cross-val's script: trains (adds 1), scores models (their mean) and submits its local model.

Cross-site evaluation asks every site for its local model (``flare.is_submit_model()``), then has every
site score every model (``flare.is_evaluate()``): the global model and each site's own.
"""

import numpy as np

import fedbus.client as flare
from fedbus.client import NPConstants


def evaluate(weights: np.ndarray) -> dict:
    return {"weight_mean": float(np.mean(weights))}


def main():
    flare.init()
    site_name = flare.system_info()["site_name"]
    last_params = None

    while flare.is_running():
        input_model = flare.receive()
        if flare.is_train():
            weights = input_model.params[NPConstants.NUMPY_KEY]
            last_params = weights + 1
            flare.send(
                flare.FLModel(
                    params={NPConstants.NUMPY_KEY: last_params},
                    params_type=flare.ParamsType.FULL,
                    metrics=evaluate(last_params),
                )
            )
        elif flare.is_evaluate():
            metrics = evaluate(input_model.params[NPConstants.NUMPY_KEY])
            print(f"{site_name}: scored a model: {metrics}")
            flare.send(flare.FLModel(metrics=metrics))
        elif flare.is_submit_model():
            if last_params is None:  # nothing trained here (evaluation-only job): nothing to submit
                flare.send(flare.FLModel(metrics={}))
            else:
                flare.send(flare.FLModel(params={NPConstants.NUMPY_KEY: last_params}))


if __name__ == "__main__":
    main()
