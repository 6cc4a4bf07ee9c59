"""Shared fixtures for cynorm's core tests. References live in tests/reference.py."""
import os
import sys

import numpy as np
import pytest

# tests/ on sys.path, so that test modules can `import reference` under any import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    from hypothesis import settings

    settings.register_profile("cynorm", max_examples=50, deadline=None)
    settings.load_profile("cynorm")
except ImportError:  # hypothesis is a test dependency; property tests importorskip it
    pass


@pytest.fixture
def rng():
    """A fresh, seeded generator per test: failures reproduce exactly."""
    return np.random.default_rng(20240611)


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)
