"""The error bound of the one-pass statistics of a piece.

A piece's moments are the shifted sums of x - k (k: the mean of its first 16 values) in
float64 lanes where that is as exact as the two-pass algorithm: k within 8 standard
deviations of the mean (cynorm/_kernels/_common.pxd, SHIFT_SPREAD). Promise: the
variance of every set is within 1e-11 (relative) of the exact variance of its stored
values, and the mean within 1e-12 standard deviations of the exact mean (plus, for
float64 data, the rounding of the deviations and of the mean themselves), whatever the
first values: data with a large mean and a tiny spread, an outlier first, and sets whose
first 16 values lie far from the rest (the shift near or outside the one-pass limit,
where the two-pass algorithm takes over). Checked in LayerNorm, GroupNorm and
InstanceNorm with eps = 0 (so that rstd gives the variance back), float32 and float64,
against a plain float64 two-pass reference of the same values.
"""
import numpy as np
import pytest

import cynorm


def _check(mean, rstd, sets):
    """float64 data: a deviation x - k is itself rounded (float32 values' are exact in
    float64), which adds 8 ulps of |x| / spread to both bounds."""
    r = 8 * 2.0 ** -53 if sets.dtype == np.float64 else 0.0
    s = sets.astype(np.float64)
    m_ref = s.mean(axis=1)
    v_ref = ((s - m_ref[:, None]) ** 2).mean(axis=1)
    mean = np.asarray(mean, dtype=np.float64).ravel()
    var = 1.0 / np.asarray(rstd, dtype=np.float64).ravel() ** 2
    big = np.abs(s).max(axis=1) / np.sqrt(v_ref)  # |x| in spreads
    rel = np.abs(var - v_ref) / v_ref
    assert (rel <= 1e-11 + r * big).all(), rel.max()
    # the float64 mean is rounded too (8 ulps of it: the result's and the reference's)
    dev = np.abs(mean - m_ref) / np.sqrt(v_ref)
    assert (dev <= 1e-12 + r * big + 8 * 2.0 ** -53 * np.abs(m_ref) / np.sqrt(v_ref)).all(), dev.max()


def _rows(rng, n_rows, K, offset, spread, dtype):
    """Normal rows with an offset; row 1 uniform (skewed sums); row 2 with its first
    value 1e6 spreads away, rows 3 and 4 with their first 16 values 1e3 and 1e6 spreads
    away (the shift, the mean of those 16, then lies up to sqrt(n / 16) spreads of the
    piece from its mean: outside the one-pass limit for pieces of 4096)."""
    x = offset + spread * rng.standard_normal((n_rows, K))
    x[1] = offset + spread * rng.random(K)
    x[2, 0] = offset + 1e6 * spread
    x[3, :16] = offset + 1e3 * spread
    x[4, :16] = offset + 1e6 * spread
    return x.astype(dtype)


CASES = [(offset, spread) for offset in (0.0, 1.0, -3e3, 1e4, 2.5e5)
         for spread in (1.0, 1e-2)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset,spread", CASES)
@pytest.mark.parametrize("K", [768, 1000, 4096, 4099, 20000])
def test_layer_norm_statistics_within_bound(dtype, offset, spread, K):
    x = _rows(np.random.default_rng(K), 6, K, offset, spread, dtype)
    _, mean, rstd = cynorm.layer_norm(x, K, eps=0.0, return_stats=True)
    _check(mean, rstd, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset,spread", CASES)
def test_group_and_instance_norm_statistics_within_bound(dtype, offset, spread):
    # runs of 576 elements, several to a piece (InstanceNorm) and several pieces to a
    # set (GroupNorm, G = 2: 4 channels of 576)
    x = _rows(np.random.default_rng(7), 16, 24 * 24, offset, spread, dtype)
    x = x.reshape(2, 8, 24, 24)
    _, mean, rstd = cynorm.group_norm(x, 2, eps=0.0, return_stats=True)
    _check(mean, rstd, x.reshape(4, -1))
    _, mean, rstd = cynorm.instance_norm(x, eps=0.0, return_stats=True)
    _check(mean, rstd, x.reshape(16, -1))
