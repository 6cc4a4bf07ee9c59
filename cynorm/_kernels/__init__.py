"""The compiled kernels, one build per instruction-set level; importing this package picks
the level that runs.

Every kernel module (slab, channel, row, runtime, ...) is compiled once per level into
cynorm/_kernels/_<level>/ (the levels: _levels.py). At import, the best level that was
built and that the CPU supports is chosen, from NumPy's CPU feature table, and its
modules are made available under their plain names: cynorm._kernels.slab is the chosen
level's slab module, for `from cynorm._kernels import slab` and
`import cynorm._kernels.slab` alike. A single-target build (CYNORM_ARCH=native at build
time) has one level, "single", which is used as it is.

CYNORM_ISA=baseline|v2|v3|v4 forces a level. An unknown name raises ImportError (a typo
must not silently run something else); a level this CPU lacks, or one not built here,
gives a RuntimeWarning and the automatic choice instead (never an illegal instruction).
"""
import importlib
import os
import pkgutil
import platform
import sys
import warnings

from cynorm._kernels._levels import ALIASES, SINGLE, levels_for

_LEVELS = levels_for(platform.machine())
_NAMES = [name for name, _, _, _ in _LEVELS]


def _cpu_features():
    """NumPy's table of the CPU's features ({} when it cannot be read)."""
    for name in ("numpy._core._multiarray_umath",  # NumPy 2
                 "numpy.core._multiarray_umath"):
        try:
            return dict(importlib.import_module(name).__cpu_features__)
        except (ImportError, AttributeError):
            continue
    return {}


def _supported(features):
    """The levels this CPU runs, lowest first (the baseline always: NumPy runs)."""
    levels = []
    for name, _, group, singles in _LEVELS:
        ok = features.get(group) if group in features else all(
            features.get(f, False) for f in singles)
        if ok or name == "baseline":
            levels.append(name)
        else:
            break
    return levels


def _built():
    """The levels whose kernels are present, lowest first, and whether a single-target
    build is present."""
    here = os.path.dirname(__file__)

    def has_modules(level):
        return any(True for _ in pkgutil.iter_modules([os.path.join(here, "_" + level)]))

    return [name for name in _NAMES if has_modules(name)], has_modules(SINGLE)


def _choose():
    """(level, reason) for this process."""
    built, single = _built()
    supported = _supported(_cpu_features())
    forced = os.environ.get("CYNORM_ISA", "").strip().lower()
    if forced in ALIASES and len(_NAMES) > 1:  # x86-64's names
        forced = ALIASES[forced]
    if forced and forced not in _NAMES:
        raise ImportError(f"CYNORM_ISA={os.environ['CYNORM_ISA']!r} is not a level of "
                          f"this machine; use one of {', '.join(_NAMES)} (or unset it)")
    if single:
        if forced:
            warnings.warn(f"CYNORM_ISA={forced} is ignored: this cynorm is a single-target "
                          "build (CYNORM_ARCH at build time)", RuntimeWarning, stacklevel=3)
        return SINGLE, "the only build present (CYNORM_ARCH at build time)"
    usable = [name for name in built if name in supported]
    if not usable:
        raise ImportError("cynorm's compiled kernels are missing (built levels: "
                          f"{built or 'none'}); build them with "
                          "`python setup.py build_ext --inplace` or reinstall cynorm")
    best = usable[-1]
    if forced in usable:
        return forced, f"forced by CYNORM_ISA={forced}"
    if forced:
        why = "the CPU lacks it" if forced not in supported else "it was not built"
        warnings.warn(f"CYNORM_ISA={forced} cannot be used ({why}); running the {best} "
                      "kernels instead", RuntimeWarning, stacklevel=3)
        return best, (f"CYNORM_ISA={forced} cannot be used ({why}); the best level "
                      "built that the CPU supports")
    return best, "the best level built that the CPU supports"


LEVEL, REASON = _choose()
BUILT_LEVELS, _HAS_SINGLE = _built()
CPU_LEVELS = _supported(_cpu_features())
MODULE_NAMES = []

for _info in pkgutil.iter_modules([os.path.join(os.path.dirname(__file__), "_" + LEVEL)]):
    _module = importlib.import_module(f"{__name__}._{LEVEL}.{_info.name}")
    sys.modules[f"{__name__}.{_info.name}"] = _module
    globals()[_info.name] = _module
    MODULE_NAMES.append(_info.name)
del _info, _module
