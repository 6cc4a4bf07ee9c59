"""Import cynorm from one built tree after another in one process, for the A/B scripts
(bench_ab.py, bench_ab_backward.py)."""
import importlib
import sys


def load(tree):
    """The cynorm package of the built tree at `tree` (any cynorm imported before is
    dropped from sys.modules first)."""
    for k in [k for k in sys.modules if k == "cynorm" or k.startswith("cynorm.")]:
        del sys.modules[k]
    sys.path.insert(0, tree)
    mod = importlib.import_module("cynorm")
    sys.path.remove(tree)
    return mod
