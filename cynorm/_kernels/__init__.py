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
import importlib.machinery
import os
import pkgutil
import platform
import struct
import sys
import warnings

from cynorm._kernels._levels import ALIASES, SINGLE, levels_for


def _needed_libraries(path):
    """The shared libraries (DT_NEEDED names) that the ELF file at path links, [] for a
    file that is not a 64-bit little-endian ELF object (the only kind built here)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for k in range(phnum):
        ptype, _, offset, vaddr, _, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + k * phentsize)
        if ptype == 1:  # PT_LOAD
            loads.append((vaddr, offset, filesz))
        elif ptype == 2:  # PT_DYNAMIC
            dynamic = (offset, filesz)
    if dynamic is None:
        return []
    needed, strtab = [], None
    for pos in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED: an offset into the string table
            needed.append(val)
        elif tag == 5:  # DT_STRTAB: the string table's address
            strtab = next(off + val - va for va, off, size in loads if va <= val < va + size)
    if strtab is None:
        return []
    return [data[strtab + n:data.index(b"\0", strtab + n)].decode() for n in needed]


def _openmp_libraries(level):
    """The file names under which the kernel modules of a level link GNU OpenMP:
    libgomp.so.1 as the compiler links it, or the name of the copy that a repaired wheel
    vendors (auditwheel: cynorm.libs/libgomp-<hash>.so.1.0.0). () for a build without
    OpenMP."""
    here = os.path.join(os.path.dirname(__file__), "_" + level)
    for info in pkgutil.iter_modules([here]):
        spec = importlib.machinery.PathFinder.find_spec(info.name, [here])
        try:
            needed = _needed_libraries(spec.origin)
        except (OSError, struct.error, ValueError, StopIteration):
            break
        return tuple(n for n in needed if n.startswith("libgomp"))
    return ("libgomp.so.1",)


def _is_library(path, name):
    """Whether the mapped file path is the library linked as name: that file, or the file
    a versioned name resolves to (libgomp.so.1 is usually libgomp.so.1.0.0)."""
    base = os.path.basename(path)
    return base == name or base.startswith(name + ".")


def _library_mappings(maps, names):
    """The executable mappings (address range, inode, file) of the libraries linked as one
    of names, in the memory map at path maps (the format of /proc/PID/maps)."""
    found = set()
    with open(maps, errors="surrogateescape") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or "x" not in parts[1]:
                continue
            path = parts[5].strip()
            if any(_is_library(path, name) for name in names):
                found.add((parts[0], parts[4], path))
    return found


def _maybe_inherited_openmp_pool(names, maps="/proc/self/maps", parent_maps=None):
    """Whether this process may be a fork child of a process that used GNU OpenMP, as
    linked under one of names (those of the kernel modules: _openmp_libraries).

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
    if not names:
        return False  # built without OpenMP
    try:
        mine = _library_mappings(maps, names)
    except OSError:
        return _loaded_without_maps(names)
    if not mine:
        return False  # not loaded yet: cynorm's fork handler will see every fork
    try:
        theirs = _library_mappings(parent_maps or f"/proc/{os.getppid()}/maps", names)
    except OSError:
        return True
    return bool(mine & theirs)


def _loaded_without_maps(names):
    """Without a readable memory map: whether one of names is loaded (then assume the
    worst), by asking the dynamic loader; False where it cannot be asked (not glibc)."""
    import ctypes
    mode = getattr(os, "RTLD_NOLOAD", None)
    if mode is None:
        return False
    for name in names:
        try:
            ctypes.CDLL(name, mode=mode)
            return True
        except OSError:
            continue
    return False


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
# before any kernel module is loaded (and with it the OpenMP runtime it links)
OPENMP_LIBRARIES = _openmp_libraries(LEVEL)
INHERITED_OPENMP_POOL = _maybe_inherited_openmp_pool(OPENMP_LIBRARIES)
BUILT_LEVELS, _HAS_SINGLE = _built()
CPU_LEVELS = _supported(_cpu_features())
MODULE_NAMES = []

for _info in pkgutil.iter_modules([os.path.join(os.path.dirname(__file__), "_" + LEVEL)]):
    _module = importlib.import_module(f"{__name__}._{LEVEL}.{_info.name}")
    sys.modules[f"{__name__}.{_info.name}"] = _module
    globals()[_info.name] = _module
    MODULE_NAMES.append(_info.name)
del _info, _module
