"""References for float16 and bfloat16 results, shared by the test modules: the
distance of a 16-bit result from a float64 reference, counted in units in the last place
of the storage dtype (see test_lowp.py for the promise they check).

bfloat16 is ml_dtypes' (BF16 is None without ml_dtypes); LOWP holds the 16-bit dtypes
this environment has, so that float16 cases run without ml_dtypes.
"""
import numpy as np

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 cases are skipped, float16 ones still run
    BF16 = None
F16 = np.dtype(np.float16)
LOWP = [F16] + ([BF16] if BF16 is not None else [])

# mantissa bits and smallest normal exponent of each 16-bit format
_FORMAT = {F16: (10, -14)}
if BF16 is not None:
    _FORMAT[BF16] = (7, -126)
# float32 rounding of the terms a result is a difference of (a few float32 ulps)
_F32_TERMS = 8 * 2.0 ** -24


def wide(a):
    """A 16-bit (or any float) array as float64, exactly (NumPy / ml_dtypes casts)."""
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        return np.asarray(a).astype(np.float64)


def grid_position(v, dt):
    """The position of float64 values v on dt's grid of finite values, counted in ulps
    from 0 (an integer for a representable value, fractional in between; negative for
    negative v): the distance of two values in ulps is the difference of positions."""
    p, emin = _FORMAT[dt]
    a = np.abs(v)
    m, e = np.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    e = e - 1
    normal = (e - emin + 1) * 2.0 ** p + (2 * m - 1) * 2.0 ** p
    sub = a / 2.0 ** (emin - p)
    pos = np.where(e >= emin, normal, sub)
    return np.where(a == 0, 0.0, np.copysign(pos, v))


def bits_position(y):
    """The grid position of 16-bit values from their bit patterns (sign-magnitude)."""
    u = np.ascontiguousarray(y).view(np.uint16).astype(np.int64)
    mag = u & 0x7FFF
    return np.where(u & 0x8000, -mag, mag).astype(np.float64)


def assert_within_one_ulp(y, expected, terms=None, what="result"):
    """y (16-bit) within 1 ulp of float64 `expected`; NaN exactly where expected is NaN,
    infinities equal. terms: the elementwise size of the terms y is a difference of;
    where given, an error within a few float32 ulps of them passes too."""
    dt = y.dtype
    assert dt in _FORMAT, dt
    expected = np.asarray(expected, dtype=np.float64)
    assert y.shape == expected.shape
    yw = wide(y)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(yw), nan), f"{what}: NaN where the reference has none"
    inf = np.isinf(expected)
    assert np.array_equal(yw[inf], expected[inf]), f"{what}: infinities differ"
    fin = ~nan & ~inf
    assert np.isfinite(yw[fin]).all(), f"{what}: overflow where the reference is finite"
    dist = np.abs(bits_position(y)[fin] - grid_position(expected[fin], dt))
    ok = dist <= 1.0
    if terms is not None:
        t = np.broadcast_to(np.asarray(terms, dtype=np.float64), expected.shape)[fin]
        ok |= np.abs(yw[fin] - expected[fin]) <= _F32_TERMS * t
    assert ok.all(), (f"{what}: {np.count_nonzero(~ok)} of {ok.size} values beyond 1 ulp "
                      f"of {dt}; worst {dist.max():.3g} ulps")
