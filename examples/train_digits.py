"""Train a small classifier of handwritten digits with NumPy and cynorm.nn only.

The data are scikit-learn's bundled 8x8 digits (1797 images, no download). The network
is a multilayer perceptron with three kinds of normalization layers from cynorm.nn;
Linear, ReLU and the softmax cross-entropy are written here in plain NumPy:

    64 pixels -> Linear(64, 128) -> as (N, 16, 8): GroupNorm(4 groups, 16 channels) -> ReLU
              -> Linear(128, 64) -> BatchNorm(64) -> ReLU
              -> Linear(64, 64)  -> LayerNorm(64) -> ReLU
              -> Linear(64, 10)  -> softmax cross-entropy

trained with plain mini-batch SGD, then evaluated on a held-out fifth of the data (eval
mode: BatchNorm uses its running statistics).

    python examples/train_digits.py              # 30 epochs, about 97-98% held out
    python examples/train_digits.py --fast       # 5 epochs, a quick check
    python examples/train_digits.py --epochs 10 --seed 1

Needs scikit-learn (for the data set only): pip install scikit-learn.
"""
import argparse
import time

import numpy as np

import cynorm.nn as cnn


# ---- plain NumPy pieces --------------------------------------------------------------

class Linear:
    """y = x @ W.T + b, with He-normal initial weights (suits the ReLUs that follow)."""

    def __init__(self, n_in, n_out, rng, dtype=np.float32):
        self.weight = (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(dtype)
        self.bias = np.zeros(n_out, dtype=dtype)
        self.grads = {}
        self._x = None

    def parameters(self):
        return {"weight": self.weight, "bias": self.bias}

    def train(self, mode=True):
        return self

    def __call__(self, x):
        self._x = x
        return x @ self.weight.T + self.bias

    def backward(self, dy):
        self.grads = {"weight": dy.T @ self._x, "bias": dy.sum(axis=0)}
        return dy @ self.weight


class ReLU:
    def __init__(self):
        self._mask = None
        self.grads = {}

    def parameters(self):
        return {}

    def train(self, mode=True):
        return self

    def __call__(self, x):
        self._mask = x > 0
        return np.where(self._mask, x, 0).astype(x.dtype, copy=False)

    def backward(self, dy):
        return np.where(self._mask, dy, 0).astype(dy.dtype, copy=False)


class Reshape:
    """(N, *a) -> (N, *shape); the backward undoes it."""

    def __init__(self, *shape):
        self.shape = shape
        self.grads = {}
        self._in_shape = None

    def parameters(self):
        return {}

    def train(self, mode=True):
        return self

    def __call__(self, x):
        self._in_shape = x.shape
        return x.reshape((x.shape[0],) + self.shape)

    def backward(self, dy):
        return dy.reshape(self._in_shape)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of the rows of `logits` against integer `labels`, and its
    gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -log_p[np.arange(n), labels].mean()
    grad = np.exp(log_p)
    grad[np.arange(n), labels] -= 1.0
    return float(loss), (grad / n).astype(logits.dtype)


class Network:
    def __init__(self, rng, n_in=64, n_classes=10, dtype=np.float32):
        self.layers = [
            Linear(n_in, 128, rng, dtype), Reshape(16, 8), cnn.GroupNorm(4, 16, dtype=dtype),
            Reshape(128), ReLU(),
            Linear(128, 64, rng, dtype), cnn.BatchNorm(64, dtype=dtype), ReLU(),
            Linear(64, 64, rng, dtype), cnn.LayerNorm(64, dtype=dtype), ReLU(),
            Linear(64, n_classes, rng, dtype),
        ]

    def train(self, mode=True):
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def sgd_step(self, lr):
        for layer in self.layers:
            for name, p in layer.parameters().items():
                p -= lr * layer.grads[name]   # in place: the layer sees the update


# ---- data and training ---------------------------------------------------------------

def load_data(seed, test_fraction=0.2):
    """Pixels scaled to [0, 1] as float32; a stratified, seeded train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)


def accuracy(net, x, y, batch_size=512):
    net.eval()
    hits = 0
    for i in range(0, len(x), batch_size):
        hits += int((net(x[i:i + batch_size]).argmax(axis=1) == y[i:i + batch_size]).sum())
    return hits / len(x)


def train(epochs=30, batch_size=32, lr=0.1, seed=0, verbose=True):
    """Train and evaluate; returns a dict with the mean training loss of each epoch
    ("losses"), "train_accuracy", "test_accuracy" and "seconds"."""
    x_train, x_test, y_train, y_test = load_data(seed)
    rng = np.random.default_rng(seed)
    net = Network(rng)
    losses = []
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(len(x_train))
        total = 0.0
        n_batches = 0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample per batch
                continue
            loss, dlogits = softmax_cross_entropy(net(x_train[idx]), y_train[idx])
            net.backward(dlogits)
            net.sgd_step(lr)
            total += loss
            n_batches += 1
        losses.append(total / n_batches)
        if verbose:
            print(f"epoch {epoch + 1:3d}  loss {losses[-1]:.4f}  "
                  f"held-out accuracy {accuracy(net, x_test, y_test):.4f}")
    result = {
        "losses": losses,
        "train_accuracy": accuracy(net, x_train, y_train),
        "test_accuracy": accuracy(net, x_test, y_test),
        "seconds": time.perf_counter() - start,
    }
    if verbose:
        print(f"train accuracy {result['train_accuracy']:.4f}, held-out accuracy "
              f"{result['test_accuracy']:.4f} ({len(y_test)} images), "
              f"{result['seconds']:.1f} s")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="number of epochs (default 30, or 5 with --fast)")
    parser.add_argument("--fast", action="store_true", help="a quick run: 5 epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (5 if args.fast else 30)
    if epochs < 1:
        parser.error("--epochs must be >= 1")
    return train(epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)


if __name__ == "__main__":
    main()
