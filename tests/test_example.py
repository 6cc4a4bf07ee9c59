"""examples/train_digits.py: a NumPy network with cynorm.nn layers learns the digits.

Needs scikit-learn (the data set ships with it); CI installs it."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_digits.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_few_epochs_lower_the_loss_and_classify_held_out_digits(example):
    result = example.train(epochs=3, seed=0, verbose=False)
    losses = result["losses"]
    assert len(losses) == 3
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["test_accuracy"] > 0.85, result
    assert result["train_accuracy"] > 0.85, result


def test_training_is_reproducible_with_a_seed(example):
    a = example.train(epochs=1, seed=3, verbose=False)
    b = example.train(epochs=1, seed=3, verbose=False)
    assert a["losses"] == b["losses"] and a["test_accuracy"] == b["test_accuracy"]


def test_network_gradient_matches_finite_differences(example):
    """The hand-written Linear/ReLU/cross-entropy backward, chained through the cynorm
    layers, is the gradient of the loss (a directional derivative, float64 network)."""
    rng = np.random.default_rng(0)
    net = example.Network(rng, dtype=np.float64)
    x = rng.random((16, 64))
    labels = rng.integers(0, 10, 16)
    net.train()

    def loss_and_grad(inp):
        loss, dlogits = example.softmax_cross_entropy(net(inp), labels)
        return loss, net.backward(dlogits)

    _, dx = loss_and_grad(x)
    v = rng.normal(size=x.shape)
    h = 1e-6
    up, _ = loss_and_grad(x + h * v)
    down, _ = loss_and_grad(x - h * v)
    np.testing.assert_allclose((up - down) / (2 * h), float((dx * v).sum()), rtol=1e-5)


def test_command_line_runs_and_reports_accuracy():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, SCRIPT, "--epochs", "1"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "held-out accuracy" in out.stdout
    assert out.stdout.count("epoch") == 1
    bad = subprocess.run([sys.executable, SCRIPT, "--epochs", "0"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode != 0 and "--epochs" in bad.stderr
