"""Thread count, OpenMP presence, the copy kernel the benchmark measures bandwidth with,
and what this build of the kernels was compiled for."""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.string cimport memcpy

from cynorm._openmp cimport CYNORM_HAVE_OPENMP, cynorm_init_fork_guard, cynorm_num_threads

from cynorm._kernels import INHERITED_OPENMP_POOL

cdef extern from *:
    """
    /* setup.py defines CYNORM_LEVEL (the level's name) and CYNORM_FLAGS (its -march...) */
    #ifndef CYNORM_LEVEL
    #define CYNORM_LEVEL "unknown"
    #endif
    #ifndef CYNORM_FLAGS
    #define CYNORM_FLAGS ""
    #endif
    /* the widest vector instructions the compiler was allowed to use here */
    #if defined(__AVX512F__)
    #define CYNORM_WIDEST_ISA "AVX-512"
    #elif defined(__AVX2__)
    #define CYNORM_WIDEST_ISA "AVX2"
    #elif defined(__AVX__)
    #define CYNORM_WIDEST_ISA "AVX"
    #elif defined(__SSE4_2__)
    #define CYNORM_WIDEST_ISA "SSE4.2"
    #elif defined(__SSE2__)
    #define CYNORM_WIDEST_ISA "SSE2"
    #elif defined(__ARM_NEON)
    #define CYNORM_WIDEST_ISA "NEON"
    #else
    #define CYNORM_WIDEST_ISA "the compiler's default"
    #endif
    """
    const char* CYNORM_LEVEL
    const char* CYNORM_FLAGS
    const char* CYNORM_WIDEST_ISA

cnp.import_array()
cynorm_init_fork_guard(INHERITED_OPENMP_POOL)


def get_num_threads():
    """Threads the next cynorm call will use: OpenMP's current maximum (OMP_NUM_THREADS,
    threadpoolctl's threadpool_limits), 1 in a build without OpenMP or in a forked child."""
    return cynorm_num_threads()


def openmp_enabled():
    """Whether this build of cynorm was compiled with OpenMP."""
    return bool(CYNORM_HAVE_OPENMP)


def parallel_copy(cnp.ndarray src, cnp.ndarray dst):
    """dst[:] = src for C-contiguous arrays of equal byte size, split over the threads in
    64 KiB blocks: one read and one write of each byte, the bandwidth yardstick."""
    cdef Py_ssize_t nbytes = src.nbytes, block = 65536, k
    cdef Py_ssize_t nblocks = (nbytes + block - 1) // block
    cdef char* s = <char*>cnp.PyArray_DATA(src)
    cdef char* d = <char*>cnp.PyArray_DATA(dst)
    cdef int nt = cynorm_num_threads()
    if dst.nbytes != nbytes or not src.flags.c_contiguous or not dst.flags.c_contiguous:
        raise ValueError("src and dst must be C-contiguous arrays of equal size")
    for k in prange(nblocks, nogil=True, num_threads=nt, schedule="static"):
        memcpy(d + k * block, s + k * block,
               block if (k + 1) * block <= nbytes else nbytes - k * block)


def build_info():
    """What these kernels were compiled for: {"level": the level's name, "flags": its
    compiler flags, "isa": the widest vector instruction set the compiler could use}."""
    return {"level": CYNORM_LEVEL.decode(), "flags": CYNORM_FLAGS.decode(),
            "isa": CYNORM_WIDEST_ISA.decode()}
