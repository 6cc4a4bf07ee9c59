# cython: language_level=3
"""cynorm's output cache: outputs of MIN_BYTES and more are allocated through a NumPy
memory handler (_pool.h) that keeps freed blocks for the next output of their size,
instead of mapping fresh memory (and taking its page faults) on every call. The cache
holds at most `limit` bytes of idle outputs (their sizes; each block's mapping is rounded
up to 2 MiB), set by CYNORM_OUTPUT_CACHE_MB at import (default 1024; 0 turns it off) or
set_output_cache()."""
import os

import numpy as np

cimport numpy as cnp

cdef extern from "_pool.h":
    object cn_pool_capsule()
    void cn_pool_set_limit(size_t limit) nogil
    void cn_pool_info(size_t* limit, size_t* cached, size_t* blocks, size_t* hits,
                      size_t* maps) nogil

cdef extern from "numpy/arrayobject.h":
    object PyDataMem_SetHandler(object handler)

cnp.import_array()

# below this, glibc's heap already reuses freed memory (it maps fresh memory for each
# allocation only from 32 MiB up)
MIN_BYTES = 16 << 20
DEFAULT_LIMIT_MB = 1024

cdef object _HANDLER = cn_pool_capsule()
cdef bint _on = False


def _limit_from_env():
    raw = os.environ.get("CYNORM_OUTPUT_CACHE_MB", "")
    if raw.strip() == "":
        return DEFAULT_LIMIT_MB << 20
    try:
        mb = int(raw)
    except ValueError:
        raise ValueError("CYNORM_OUTPUT_CACHE_MB must be a whole number of MiB, "
                         f"got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"CYNORM_OUTPUT_CACHE_MB must be >= 0, got {mb}")
    return mb << 20


def set_output_cache(max_bytes):
    """Keep freed outputs of at most max_bytes in all for reuse (counted by their sizes;
    an output of exactly max_bytes is kept; 0: keep none, and release what is kept now).
    Returns the previous limit."""
    global _on
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)):
        raise TypeError("max_bytes must be an int, got "
                        f"{type(max_bytes).__name__}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    previous = output_cache_info()["limit"]
    cn_pool_set_limit(<size_t>max_bytes)
    _on = max_bytes > 0
    return previous


def output_cache_info():
    """The cache's state: limit (bytes), cached (bytes of the idle outputs held), blocks (idle blocks),
    hits (outputs given an idle block), maps (blocks mapped afresh)."""
    cdef size_t limit, cached, blocks, hits, maps
    cn_pool_info(&limit, &cached, &blocks, &hits, &maps)
    return {"limit": limit, "cached": cached, "blocks": blocks, "hits": hits,
            "maps": maps}


def empty(shape, dtype, nbytes):
    """np.empty(shape, dtype), from the cache when nbytes (its size) >= MIN_BYTES."""
    if nbytes < MIN_BYTES or not _on:
        return np.empty(shape, dtype=dtype)
    old = PyDataMem_SetHandler(_HANDLER)
    try:
        return np.empty(shape, dtype=dtype)
    finally:
        PyDataMem_SetHandler(old)


def empty_like(x):
    """np.empty_like(x) for a C-contiguous x, from the cache when x is large."""
    return empty(x.shape, x.dtype, x.nbytes)


set_output_cache(_limit_from_env())
