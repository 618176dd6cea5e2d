"""hello-lr's script: the gradient and Hessian of the logistic loss on local data, for a server Newton step.

The site never sends its data or its own weights: only ``gradient`` = X^T (y - p) and ``hessian`` = X^T D X at
the global weights; the server solves for the step (``FedAvgLrRecipe``).
"""

import argparse
import os

import numpy as np

import fedbus.client as flare
from fedbus.client import FLMetaKey, FLModel, NPConstants, ParamsType
from fedbus.client.tracking import SummaryWriter


def load_data(data_root, site_name):
    def part(name):
        return np.load(os.path.join(data_root, f"{site_name}.{name}.npy"))

    return {
        "train_X": part("train.x"),
        "train_y": part("train.y"),
        "valid_X": part("test.x"),
        "valid_y": part("test.y"),
    }


def with_bias(x):
    return np.concatenate((np.ones((x.shape[0], 1)), x), axis=1)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def newton_terms(data, theta):
    x = with_bias(data["train_X"])
    p = sigmoid(x @ theta)
    weights = (p * (1 - p))[:, 0]
    return {"gradient": x.T @ (data["train_y"] - p), "hessian": (x.T * weights) @ x}


def validate(data, theta):
    predicted = sigmoid(with_bias(data["valid_X"]) @ theta).round()
    truth = data["valid_y"]
    true_pos = float(((predicted == 1) & (truth == 1)).sum())
    return {
        "accuracy": float((predicted == truth).mean()),
        "precision": true_pos / max(float((predicted == 1).sum()), 1.0),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_root", type=str, required=True)
    args = parser.parse_args()

    flare.init()
    site_name = flare.get_site_name()
    data = load_data(args.data_root, site_name)
    writer = SummaryWriter()

    while flare.is_running():
        global_model = flare.receive()
        theta = global_model.params[NPConstants.NUMPY_KEY]
        scores = validate(data, theta)
        print(f"{site_name}: round {global_model.current_round}, global model scores {scores}")
        writer.add_scalar("accuracy", scores["accuracy"], global_model.current_round)
        writer.add_scalar("precision", scores["precision"], global_model.current_round)

        result = FLModel(params=newton_terms(data, theta), params_type=ParamsType.FULL, metrics=scores)
        result.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] = data["train_X"].shape[0]
        flare.send(result)


if __name__ == "__main__":
    main()
