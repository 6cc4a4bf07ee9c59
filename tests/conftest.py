"""Shared fixtures for cynorm's core tests. References live in tests/reference.py.

Hypothesis profiles, chosen by the environment variable CYNORM_HYPOTHESIS_PROFILE (or
pytest's --hypothesis-profile option):

- "ci" (the default): derandomized. Every run draws the same examples (a fixed seed
  derived from each test), no example database: a failure reappears on every run.
- "fuzz": long randomized runs (20 times the examples), for developers. The run's seed is
  printed in the header and again after a failure; `--hypothesis-seed=N` reruns it with
  the same examples. A failing example is also printed as a @reproduce_failure blob.
"""
import os
import random
import sys

import numpy as np
import pytest

# tests/ on sys.path, so that test modules can `import reference` under any import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROFILE = os.environ.get("CYNORM_HYPOTHESIS_PROFILE", "ci")
# examples per property test on the ci profile; the fuzz profile runs 20 times as many
CI_EXAMPLES = 100

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=CI_EXAMPLES, deadline=None,
                              derandomize=True, database=None, print_blob=True)
    settings.register_profile("fuzz", max_examples=20 * CI_EXAMPLES, deadline=None,
                              derandomize=False, print_blob=True)
    settings.load_profile(PROFILE)
except ImportError:  # hypothesis is a test dependency; property tests importorskip it
    settings = None


def _randomized(config):
    """Whether this run's hypothesis profile draws random examples."""
    if settings is None:
        return False
    name = config.getoption("--hypothesis-profile", None) or PROFILE
    return not settings.get_profile(name).derandomize


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # A randomized run gets one seed for all its tests (hypothesis' own plugin applies
    # it), chosen here so that it can be printed and passed back with --hypothesis-seed.
    if _randomized(config) and config.getoption("--hypothesis-seed", None) is None:
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))


def _seed_line(config):
    name = config.getoption("--hypothesis-profile", None) or PROFILE
    seed = config.getoption("--hypothesis-seed", None)
    return (f"hypothesis profile {name!r}, randomized, seed {seed}; the same examples again: "
            f"CYNORM_HYPOTHESIS_PROFILE={name} python -m pytest --hypothesis-seed={seed} ...")


def pytest_report_header(config):
    if _randomized(config):
        return _seed_line(config)
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _randomized(config) and terminalreporter.stats.get("failed"):
        terminalreporter.write_line(_seed_line(config))


@pytest.fixture
def rng():
    """A fresh, seeded generator per test: failures reproduce exactly."""
    return np.random.default_rng(20240611)


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)
