"""Float32 outputs of 32 MiB or more are stored past the caches (non-temporal stores of
whole aligned vectors, the head and tail element by element): every forward, and the
GroupNorm/InstanceNorm backward dx, stay correct there at any alignment of the output,
with run and row lengths that leave a head and a tail."""

import numpy as np
import pytest

import cynorm
import reference as ref
from reference import assert_close

# 2 * 64 * 65537 float32: just over 32 MiB, runs of an odd length
SLAB = (2, 64, 65537)
# 8193 rows of 1025 float32: just over 32 MiB, rows of an odd length
ROWS = (8193, 1025)


def _out(shape, offset):
    return ref.at_offset(np.full(shape, np.nan, np.float32), offset)


@pytest.fixture(scope="module")
def slab():
    r = np.random.default_rng(11)
    x = (r.standard_normal(SLAB, dtype=np.float32) * 2 + 0.5)
    dy = r.standard_normal(SLAB, dtype=np.float32)
    w = r.standard_normal(SLAB[1]).astype(np.float32)
    b = r.standard_normal(SLAB[1]).astype(np.float32)
    return x, dy, w, b


@pytest.mark.parametrize("offset", [0, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_forward_over_the_stream_threshold_matches_reference(slab, offset,
                                                                        activation):
    x, _, w, b = slab
    out = _out(SLAB, offset)
    y = cynorm.group_norm(ref.at_offset(x, offset), 8, w, b, out=out,
                          activation=activation)
    assert y is out
    assert_close(y, ref.activation(activation, ref.group_norm(x, 8, w, b)[0]), np.float32)


@pytest.mark.parametrize("offset", [0, 8])
def test_instance_and_batch_norm_forward_over_the_stream_threshold_match_reference(
        slab, offset):
    x, _, w, b = slab
    out = _out(SLAB, offset)
    y = cynorm.instance_norm(ref.at_offset(x, offset), weight=w, bias=b, out=out)
    assert_close(y, ref.instance_norm(x, w, b)[0], np.float32)
    out = _out(SLAB, offset)
    y = cynorm.batch_norm(ref.at_offset(x, offset), None, None, w, b, training=True,
                          out=out)
    assert_close(y, ref.batch_norm(x, None, None, w, b, training=True)[0], np.float32)


@pytest.mark.parametrize("offset", [0, 12])
def test_group_norm_backward_over_the_stream_threshold_matches_reference(slab, offset):
    x, dy, w, _ = slab
    _, mean, rstd = ref.group_norm(x, 8, w)
    out = _out(SLAB, offset)
    dx, dw, db = cynorm.group_norm_backward(ref.at_offset(dy, offset),
                                            ref.at_offset(x, offset), mean, rstd, 8, w,
                                            out=out)
    assert dx is out
    dx_ref, dw_ref, db_ref = ref.group_norm_backward(dy, x, mean, rstd, 8, w)
    assert_close(dx, dx_ref, np.float32, "backward", ref.dx_scale(dy, rstd, w))
    assert_close(dw, dw_ref, np.float32, "backward")
    assert_close(db, db_ref, np.float32, "backward")


@pytest.mark.parametrize("offset", [0, 4])
def test_layer_and_rms_norm_forward_over_the_stream_threshold_match_reference(offset):
    r = np.random.default_rng(12)
    x = r.standard_normal(ROWS, dtype=np.float32) + 1
    w = r.standard_normal(ROWS[1]).astype(np.float32)
    b = r.standard_normal(ROWS[1]).astype(np.float32)
    xo = ref.at_offset(x, offset)
    out = _out(ROWS, offset)
    y = cynorm.layer_norm(xo, ROWS[1], w, b, out=out)
    assert y is out
    assert_close(y, ref.layer_norm(x, ROWS[1], w, b)[0], np.float32)
    out = _out(ROWS, offset)
    y = cynorm.rms_norm(xo, ROWS[1], w, out=out)
    assert_close(y, ref.rms_norm(x, ROWS[1], w)[0], np.float32)
