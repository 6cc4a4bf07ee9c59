"""The kernel families (slab, channel, row) and the runtime helpers.

This file runs before any kernel module is loaded, and so before cynorm's own load of
the GNU OpenMP runtime: it decides whether this process may hold a stale OpenMP thread
pool inherited through fork() (see cynorm/_openmp.pxd).
"""
import os


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
