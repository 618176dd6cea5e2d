"""Split scikit-learn's bundled breast-cancer data (569 samples, 30 features) across sites, as .npy files.

Each site gets ``site-N.{train,test}.{x,y}.npy`` in ``--data_root``: a disjoint, stratified shard, features
standardized with statistics of the whole training split (a stand-in for an agreed preprocessing).
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

DATA_ROOT = "/tmp/fedbus/dataset/breast_cancer"


def prepare(data_root: str = DATA_ROOT, n_clients: int = 2, seed: int = 0) -> Path:
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    root = Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
    for part, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        order = np.random.default_rng(seed).permutation(len(ys))
        for i, idx in enumerate(np.array_split(order, n_clients)):
            np.save(root / f"site-{i + 1}.{part}.x.npy", (xs[idx] - mean) / std)
            np.save(root / f"site-{i + 1}.{part}.y.npy", ys[idx].reshape(-1, 1).astype(np.float64))
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_root", default=DATA_ROOT)
    parser.add_argument("--n_clients", type=int, default=2)
    args = parser.parse_args()
    print("data written to", prepare(args.data_root, args.n_clients))
