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

This file runs before any kernel module is loaded, and so before cynorm's own load of
the GNU OpenMP runtime: it decides whether this process may hold a stale OpenMP thread
pool inherited through fork() (see cynorm/_openmp.pxd).
"""
import importlib
import os
import pkgutil
import platform
import sys
import warnings

from cynorm._kernels._levels import ALIASES, SINGLE, levels_for


def _maps_entry(path, addr):
    """(range, inode, file) of the line of the memory map at `path` that contains addr,
    or None."""
    with open(path) as f:
        for line in f:
            parts = line.split(None, 5)
            lo, _, hi = parts[0].partition("-")
            if int(lo, 16) <= addr < int(hi, 16):
                return parts[0], parts[4], parts[5].strip() if len(parts) > 5 else ""
    return None


def _maybe_inherited_openmp_pool():
    """Whether this process may be a fork child of a process that used GNU OpenMP.

    GNU OpenMP's thread pool does not survive fork(): a child entering a parallel region
    that its parent's pool served hangs. If cynorm loads libgomp itself (not loaded
    yet), no pool can predate cynorm's pthread_atfork handler, which marks every later
    fork child. If libgomp is already loaded (torch, or any OpenMP library, came first),
    its pool may have run in an ancestor that forked this process before cynorm was
    imported anywhere. fork() copies the address space, so a fork child sees libgomp at
    the very address its parent has it at, while an independently started process (exec
    and address-space randomisation) does not: a parent mapping libgomp's code at the
    same address range, same file and inode, means this process is a fork child (or a
    grandchild: its parent is then a fork child too). When the maps cannot be read
    (no /proc, parent not readable), assume the worst: single-threaded is slower, a
    stale pool hangs.
    """
    import ctypes
    mode = getattr(os, "RTLD_NOLOAD", None)
    if mode is None:  # no dlopen semantics to ask with: not a glibc system
        return False
    try:
        gomp = ctypes.CDLL("libgomp.so.1", mode=mode)
    except OSError:
        return False  # not loaded yet: cynorm's fork handler will see every fork
    try:
        addr = ctypes.cast(gomp.omp_get_max_threads, ctypes.c_void_p).value
        mine = _maps_entry("/proc/self/maps", addr)
        if mine is None:
            return True
        return _maps_entry(f"/proc/{os.getppid()}/maps", addr) == mine
    except (OSError, ValueError, IndexError, AttributeError):
        return True


INHERITED_OPENMP_POOL = _maybe_inherited_openmp_pool()


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
