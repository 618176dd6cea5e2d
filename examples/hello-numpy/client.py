"""hello-numpy's training script: a FLARE numpy client, with only its import lines changed.

"Training" adds 1 to every weight, so the federation's arithmetic can be checked by hand: after round r the
global model is the initial one plus r (FULL and DIFF alike).
"""

import argparse

import numpy as np

import fedbus.client as flare
from fedbus.client import NPConstants
from fedbus.client.tracking import SummaryWriter


def train(weights: np.ndarray) -> np.ndarray:
    return weights + 1


def evaluate(weights: np.ndarray) -> dict:
    return {"weight_mean": float(np.mean(weights))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--update_type", choices=["full", "diff"], default="full")
    args = parser.parse_args()

    flare.init()
    site_name = flare.system_info()["site_name"]
    writer = SummaryWriter()
    print(f"{site_name}: initialized")

    while flare.is_running():
        input_model = flare.receive()
        weights = input_model.params[NPConstants.NUMPY_KEY]
        print(f"{site_name}: round {input_model.current_round}, received mean {weights.mean():.3f}")

        new_weights = train(weights)
        metrics = evaluate(new_weights)
        writer.add_scalar(tag="weight_mean", scalar=metrics["weight_mean"], global_step=input_model.current_round)

        if args.update_type == "diff":
            params, params_type = new_weights - weights, flare.ParamsType.DIFF
        else:
            params, params_type = new_weights, flare.ParamsType.FULL
        flare.send(
            flare.FLModel(
                params={NPConstants.NUMPY_KEY: params},
                params_type=params_type,
                metrics=metrics,
                current_round=input_model.current_round,
            )
        )


if __name__ == "__main__":
    main()
