"""NumPy memory a call allocates beyond what it returns, measured with tracemalloc (NumPy
reports its data buffers to it): the memory tests' one measuring helper."""
import tracemalloc


def _nbytes(result):
    if isinstance(result, tuple):
        return sum(a.nbytes for a in result)
    return result.nbytes


def extra_memory(call):
    """(peak bytes allocated during call() beyond the bytes of what it returns, result);
    result is an array or a tuple of arrays."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result = call()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return peak - _nbytes(result), result
