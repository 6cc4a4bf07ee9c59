# The only place that touches omp.h. Without OpenMP the build is sequential: Cython's
# prange already compiles to a plain loop, and these fall back to one thread.
#
# Fork safety: GNU OpenMP's thread pool does not survive fork(); a child that enters a
# parallel region after its parent used the pool hangs. cynorm runs single-threaded in a
# process that may hold such a stale pool: one forked after cynorm was loaded (a
# pthread_atfork child handler, registered by every kernel module as it loads, marks it)
# and one forked, before cynorm was imported, from a process that had already loaded
# GNU OpenMP (torch, or any other OpenMP library): cynorm/_kernels/__init__.py detects
# that at import and each module passes it to cynorm_init_fork_guard.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CYNORM_HAVE_OPENMP 1
    #else
    #define CYNORM_HAVE_OPENMP 0
    static inline int omp_get_max_threads(void) { return 1; }
    #endif
    #include <pthread.h>

    static int cynorm_in_forked_child = 0;
    static void cynorm_mark_forked_child(void) { cynorm_in_forked_child = 1; }
    static int cynorm_init_fork_guard(int inherited_pool) {
        if (inherited_pool) cynorm_in_forked_child = 1;
        return pthread_atfork(NULL, NULL, cynorm_mark_forked_child);
    }
    static inline int cynorm_num_threads(void) {
        int n;
        if (cynorm_in_forked_child) return 1;
        n = omp_get_max_threads();
        return n < 1 ? 1 : n;
    }
    /* Below this many elements a call runs in the calling thread: waking a team costs
       microseconds (far more on a loaded machine) and a small array is done sooner. */
    #define CYNORM_PARALLEL_MIN 65536
    static inline int cynorm_threads_for(Py_ssize_t n_elements) {
        return n_elements < CYNORM_PARALLEL_MIN ? 1 : cynorm_num_threads();
    }
    """
    const int CYNORM_HAVE_OPENMP
    int cynorm_in_forked_child
    # Register the fork handler; inherited_pool = 1 marks this process at once.
    int cynorm_init_fork_guard(int inherited_pool) noexcept nogil
    # Threads for the next parallel region: what OMP_NUM_THREADS / threadpoolctl set now.
    int cynorm_num_threads() noexcept nogil
    # Threads for a call over n_elements: 1 for small arrays, else cynorm_num_threads().
    int cynorm_threads_for(Py_ssize_t n_elements) noexcept nogil
