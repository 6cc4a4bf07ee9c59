"""Thread count, OpenMP presence, the copy kernel the benchmark measures bandwidth with,
and what this build of the kernels was compiled for."""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.string cimport memcpy

import numpy as np

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


cdef extern from "_activations.h":
    void cn_act_f32(const float* a, float* y, Py_ssize_t n, int act) noexcept nogil
    void cn_act_f64(const double* a, double* y, Py_ssize_t n, int act) noexcept nogil
    void cn_act_grad_f32(const float* a, const float* dy, float* g, Py_ssize_t n,
                         int act) noexcept nogil
    void cn_act_grad_f64(const double* a, const double* dy, double* g, Py_ssize_t n,
                         int act) noexcept nogil


def _check_act_arrays(arrays, int act):
    if not 0 <= act <= 4:
        raise ValueError(f"act must be a code 0..4, got {act}")
    first = arrays[0]
    for a in arrays:
        if (not isinstance(a, cnp.ndarray) or a.dtype not in (np.float32, np.float64)
                or a.dtype != first.dtype or a.size != first.size
                or not a.flags.c_contiguous):
            raise ValueError("arrays must be C-contiguous float32 or float64 ndarrays "
                             "of one dtype and size")


def activation(cnp.ndarray a, cnp.ndarray y, int act):
    """y = act(a) elementwise, with the kernels' activation code (1 silu, 2 gelu,
    3 gelu_tanh, 4 relu); y may be a. Exposes the epilogue for its tests."""
    _check_act_arrays((a, y), act)
    cdef Py_ssize_t n = a.size
    cdef void* pa = cnp.PyArray_DATA(a)
    cdef void* py = cnp.PyArray_DATA(y)
    cdef bint single = a.dtype == np.float32
    with nogil:
        if single:
            cn_act_f32(<float*>pa, <float*>py, n, act)
        else:
            cn_act_f64(<double*>pa, <double*>py, n, act)


def activation_grad(cnp.ndarray a, cnp.ndarray dy, cnp.ndarray g, int act):
    """g = dy * act'(a) elementwise (codes as in activation); g may be a or dy."""
    _check_act_arrays((a, dy, g), act)
    cdef Py_ssize_t n = a.size
    cdef void* pa = cnp.PyArray_DATA(a)
    cdef void* pd = cnp.PyArray_DATA(dy)
    cdef void* pg = cnp.PyArray_DATA(g)
    cdef bint single = a.dtype == np.float32
    with nogil:
        if single:
            cn_act_grad_f32(<float*>pa, <float*>pd, <float*>pg, n, act)
        else:
            cn_act_grad_f64(<double*>pa, <double*>pd, <double*>pg, n, act)
