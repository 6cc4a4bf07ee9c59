"""Every bad argument gets a TypeError or ValueError whose message names the argument,
before any kernel runs (never a crash, never a silent wrong answer)."""
import numpy as np
import pytest

import cynorm

F64 = np.float64


def x4():
    return np.random.default_rng(0).standard_normal((2, 4, 3))


def stats(N=2, G=2):
    return np.zeros((N, G)), np.ones((N, G))


def read_only(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def overlapping_pair(shape):
    """(x, out): views of one buffer shifted by one element, a partial overlap."""
    size = int(np.prod(shape))
    buf = np.random.default_rng(1).standard_normal(size + 1)
    return buf[1:].reshape(shape), buf[:-1].reshape(shape)


def _gn_partial_overlap():
    x, out = overlapping_pair((2, 4, 3))
    cynorm.group_norm(x, 2, out=out)


def _gn_bwd_partial_overlap_dy():
    x = x4()
    dy, out = overlapping_pair((2, 4, 3))
    cynorm.group_norm_backward(dy, x, *stats(), 2, out=out)


def _bn_partial_overlap():
    x, out = overlapping_pair((4, 3, 2))
    cynorm.batch_norm(x, training=True, out=out)


def _ln_partial_overlap():
    x, out = overlapping_pair((3, 5))
    cynorm.layer_norm(x, 5, out=out)


def _rms_partial_overlap():
    x, out = overlapping_pair((3, 5))
    cynorm.rms_norm(x, 5, out=out)


def _gn_out_view_of_x_with_other_strides():
    # out shares x's buffer but as a different view: not "the same array"
    x = np.zeros((2, 4, 4))
    out = x.transpose(0, 2, 1).copy()  # separate, fine
    cynorm.group_norm(x, 2, out=out)  # must not raise
    out = x.reshape(2, 4, 4)[:, :, ::-1]  # reversed view: overlaps x entirely
    cynorm.group_norm(x, 2, out=out)


# (id, call, exception type(s), regex the message must match)
CASES = [
    # ---- group_norm: x ----
    ("gn-x-1d", lambda: cynorm.group_norm(np.zeros(4), 2), ValueError, r"\bx\b"),
    ("gn-x-0d", lambda: cynorm.group_norm(np.float64(1.0), 1), ValueError, r"\bx\b"),
    ("gn-x-int", lambda: cynorm.group_norm(np.zeros((2, 4, 3), np.int32), 2),
     TypeError, r"\bx\b"),
    ("gn-x-int64", lambda: cynorm.group_norm(np.zeros((2, 4, 3), np.int64), 2),
     TypeError, r"\bx\b"),
    ("gn-x-bool", lambda: cynorm.group_norm(np.zeros((2, 4, 3), bool), 2),
     TypeError, r"\bx\b"),
    ("gn-x-complex", lambda: cynorm.group_norm(np.zeros((2, 4, 3), np.complex128), 2),
     TypeError, r"\bx\b"),
    ("gn-x-int16", lambda: cynorm.group_norm(np.zeros((2, 4, 3), np.int16), 2),
     TypeError, r"(?s)\bx\b.*float16 or bfloat16 array.*int16"),
    ("gn-x-object", lambda: cynorm.group_norm(np.array([[None, 1.0]], dtype=object), 1),
     TypeError, r"\bx\b"),
    ("gn-x-none", lambda: cynorm.group_norm(None, 1), TypeError, r"\bx\b"),
    ("gn-x-ragged", lambda: cynorm.group_norm([[1.0, 2.0], [3.0]], 1),
     (TypeError, ValueError), r"\bx\b"),
    # ---- group_norm: num_groups ----
    ("gn-groups-not-dividing", lambda: cynorm.group_norm(x4(), 3), ValueError,
     r"num_groups"),
    ("gn-groups-more-than-C", lambda: cynorm.group_norm(x4(), 8), ValueError,
     r"num_groups"),
    ("gn-groups-zero", lambda: cynorm.group_norm(x4(), 0), ValueError, r"num_groups"),
    ("gn-groups-negative", lambda: cynorm.group_norm(x4(), -2), ValueError,
     r"num_groups"),
    ("gn-groups-float", lambda: cynorm.group_norm(x4(), 2.0), TypeError, r"num_groups"),
    ("gn-groups-str", lambda: cynorm.group_norm(x4(), "2"), TypeError, r"num_groups"),
    ("gn-groups-none", lambda: cynorm.group_norm(x4(), None), TypeError, r"num_groups"),
    # ---- group_norm: weight / bias ----
    ("gn-weight-short", lambda: cynorm.group_norm(x4(), 2, np.ones(3)), ValueError,
     r"weight"),
    ("gn-weight-2d", lambda: cynorm.group_norm(x4(), 2, np.ones((4, 1))), ValueError,
     r"weight"),
    ("gn-weight-scalar", lambda: cynorm.group_norm(x4(), 2, np.float64(2.0)), ValueError,
     r"weight"),
    ("gn-weight-complex", lambda: cynorm.group_norm(x4(), 2, np.ones(4, np.complex64)),
     TypeError, r"weight"),
    ("gn-bias-long", lambda: cynorm.group_norm(x4(), 2, np.ones(4), np.ones(5)),
     ValueError, r"bias"),
    ("gn-bias-complex", lambda: cynorm.group_norm(x4(), 2, None, np.ones(4, complex)),
     TypeError, r"bias"),
    # ---- group_norm: eps / stats ----
    ("gn-eps-negative", lambda: cynorm.group_norm(x4(), 2, eps=-1e-5), ValueError,
     r"eps"),
    ("gn-eps-nan", lambda: cynorm.group_norm(x4(), 2, eps=float("nan")), ValueError,
     r"eps"),
    ("gn-eps-str", lambda: cynorm.group_norm(x4(), 2, eps="small"), TypeError, r"eps"),
    ("gn-eps-none", lambda: cynorm.group_norm(x4(), 2, eps=None), TypeError, r"eps"),
    ("gn-stats-unknown", lambda: cynorm.group_norm(x4(), 2, stats="kahan"), ValueError,
     r"stats"),
    ("gn-stats-none", lambda: cynorm.group_norm(x4(), 2, stats=None),
     (TypeError, ValueError), r"stats"),
    # ---- group_norm: out ----
    ("gn-out-shape", lambda: cynorm.group_norm(x4(), 2, out=np.empty((2, 4, 4))),
     ValueError, r"\bout\b"),
    ("gn-out-dtype", lambda: cynorm.group_norm(x4(), 2, out=np.empty((2, 4, 3), np.float32)),
     (TypeError, ValueError), r"\bout\b"),
    ("gn-out-non-contiguous",
     lambda: cynorm.group_norm(x4(), 2, out=np.empty((2, 4, 6))[:, :, ::2]),
     ValueError, r"\bout\b"),
    ("gn-out-fortran",
     lambda: cynorm.group_norm(x4(), 2, out=np.asfortranarray(np.empty((2, 4, 3)))),
     ValueError, r"\bout\b"),
    ("gn-out-read-only", lambda: cynorm.group_norm(x4(), 2, out=read_only(np.empty((2, 4, 3)))),
     ValueError, r"\bout\b"),
    ("gn-out-list", lambda: cynorm.group_norm(x4(), 2, out=[[0.0] * 3] * 4),
     TypeError, r"\bout\b"),
    ("gn-out-partial-overlap", _gn_partial_overlap, ValueError, r"\bout\b"),
    ("gn-out-reversed-view-of-x", _gn_out_view_of_x_with_other_strides, ValueError,
     r"\bout\b"),
    # ---- group_norm_backward ----
    ("gnb-dy-shape", lambda: cynorm.group_norm_backward(np.zeros((2, 4, 4)), x4(), *stats(), 2),
     ValueError, r"\bdy\b"),
    ("gnb-dy-dtype", lambda: cynorm.group_norm_backward(
        np.zeros((2, 4, 3), np.float32), x4(), *stats(), 2), (TypeError, ValueError),
     r"\bdy\b"),
    ("gnb-dy-float16", lambda: cynorm.group_norm_backward(
        np.zeros((2, 4, 3), np.float16), x4(), *stats(), 2), TypeError,
     r"(?s)\bdy\b.*dtype of x.*float16"),
    ("gnb-dy-int", lambda: cynorm.group_norm_backward(
        np.zeros((2, 4, 3), int), x4(), *stats(), 2), TypeError, r"\bdy\b"),
    ("gnb-x-complex", lambda: cynorm.group_norm_backward(
        np.zeros((2, 4, 3)), np.zeros((2, 4, 3), complex), *stats(), 2), TypeError,
     r"\bx\b"),
    ("gnb-x-1d", lambda: cynorm.group_norm_backward(np.zeros(4), np.zeros(4), *stats(), 2),
     ValueError, r"\bx\b|\bdy\b"),
    ("gnb-mean-shape", lambda: cynorm.group_norm_backward(
        x4(), x4(), np.zeros((2, 3)), np.ones((2, 2)), 2), ValueError, r"\bmean\b"),
    ("gnb-mean-flat", lambda: cynorm.group_norm_backward(
        x4(), x4(), np.zeros(4), np.ones((2, 2)), 2), ValueError, r"\bmean\b"),
    ("gnb-rstd-shape", lambda: cynorm.group_norm_backward(
        x4(), x4(), np.zeros((2, 2)), np.ones((2, 1)), 2), ValueError, r"\brstd\b"),
    ("gnb-mean-complex", lambda: cynorm.group_norm_backward(
        x4(), x4(), np.zeros((2, 2), complex), np.ones((2, 2)), 2), TypeError, r"\bmean\b"),
    ("gnb-groups-not-dividing", lambda: cynorm.group_norm_backward(x4(), x4(), *stats(2, 3), 3),
     ValueError, r"num_groups"),
    ("gnb-groups-zero", lambda: cynorm.group_norm_backward(x4(), x4(), *stats(), 0),
     ValueError, r"num_groups"),
    ("gnb-groups-float", lambda: cynorm.group_norm_backward(x4(), x4(), *stats(), 2.0),
     TypeError, r"num_groups"),
    ("gnb-weight-shape", lambda: cynorm.group_norm_backward(
        x4(), x4(), *stats(), 2, np.ones(2)), ValueError, r"weight"),
    ("gnb-out-shape", lambda: cynorm.group_norm_backward(
        x4(), x4(), *stats(), 2, out=np.empty((2, 4))), ValueError, r"\bout\b"),
    ("gnb-out-dtype", lambda: cynorm.group_norm_backward(
        x4(), x4(), *stats(), 2, out=np.empty((2, 4, 3), np.float32)),
     (TypeError, ValueError), r"\bout\b"),
    ("gnb-out-non-contiguous", lambda: cynorm.group_norm_backward(
        x4(), x4(), *stats(), 2, out=np.empty((4, 4, 3))[::2]), ValueError, r"\bout\b"),
    ("gnb-out-read-only", lambda: cynorm.group_norm_backward(
        x4(), x4(), *stats(), 2, out=read_only(np.empty((2, 4, 3)))), ValueError,
     r"\bout\b"),
    ("gnb-out-partial-overlap-dy", _gn_bwd_partial_overlap_dy, ValueError, r"\bout\b"),
    # ---- instance_norm ----
    ("in-x-1d", lambda: cynorm.instance_norm(np.zeros(5)), ValueError, r"\bx\b"),
    ("in-x-int16", lambda: cynorm.instance_norm(np.zeros((2, 3, 4), np.int16)),
     TypeError, r"\bx\b.*int16"),
    ("in-weight-shape", lambda: cynorm.instance_norm(x4(), weight=np.ones(3)), ValueError,
     r"weight"),
    ("in-bias-shape", lambda: cynorm.instance_norm(x4(), bias=np.ones((4, 4))),
     ValueError, r"bias"),
    ("in-eps-negative", lambda: cynorm.instance_norm(x4(), eps=-1.0), ValueError, r"eps"),
    ("in-stats-unknown", lambda: cynorm.instance_norm(x4(), stats="one_pass"),
     ValueError, r"stats"),
    ("in-out-read-only", lambda: cynorm.instance_norm(x4(), out=read_only(x4())),
     ValueError, r"\bout\b"),
    ("inb-mean-shape", lambda: cynorm.instance_norm_backward(
        x4(), x4(), np.zeros((2, 2)), np.ones((2, 4))), ValueError, r"\bmean\b"),
    ("inb-rstd-shape", lambda: cynorm.instance_norm_backward(
        x4(), x4(), np.zeros((2, 4)), np.ones((4, 2))), ValueError, r"\brstd\b"),
    ("inb-dy-shape", lambda: cynorm.instance_norm_backward(
        np.zeros((2, 4, 2)), x4(), np.zeros((2, 4)), np.ones((2, 4))), ValueError,
     r"\bdy\b"),
    # ---- batch_norm ----
    ("bn-x-1d", lambda: cynorm.batch_norm(np.zeros(4), training=True), ValueError,
     r"\bx\b"),
    ("bn-x-int", lambda: cynorm.batch_norm(np.zeros((4, 3), int), training=True),
     TypeError, r"\bx\b"),
    ("bn-x-int16", lambda: cynorm.batch_norm(np.zeros((4, 3), np.int16), training=True),
     TypeError, r"\bx\b.*int16"),
    ("bn-running-mean-shape", lambda: cynorm.batch_norm(
        x4(), np.zeros(3), np.ones(4), training=True), ValueError, r"running_mean"),
    ("bn-running-var-shape", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), np.ones(5), training=False), ValueError, r"running_var"),
    ("bn-running-mean-int", lambda: cynorm.batch_norm(
        x4(), np.zeros(4, int), np.ones(4), training=True), TypeError, r"running_mean"),
    ("bn-running-var-read-only-training", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), read_only(np.ones(4)), training=True), ValueError,
     r"running_var"),
    ("bn-running-mean-read-only-training", lambda: cynorm.batch_norm(
        x4(), read_only(np.zeros(4)), np.ones(4), training=True), ValueError,
     r"running_mean"),
    ("bn-eval-missing-running-mean", lambda: cynorm.batch_norm(
        x4(), None, np.ones(4), training=False), ValueError, r"running_mean"),
    ("bn-eval-missing-running-var", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), None, training=False), ValueError, r"running_var"),
    ("bn-eval-missing-both", lambda: cynorm.batch_norm(x4()), ValueError, r"running_"),
    ("bn-momentum-negative", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), np.ones(4), training=True, momentum=-0.1), ValueError,
     r"momentum"),
    ("bn-momentum-above-one", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), np.ones(4), training=True, momentum=1.5), ValueError,
     r"momentum"),
    ("bn-momentum-nan", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), np.ones(4), training=True, momentum=float("nan")), ValueError,
     r"momentum"),
    ("bn-momentum-str", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), np.ones(4), training=True, momentum="fast"),
     (TypeError, ValueError), r"momentum"),
    ("bn-weight-shape", lambda: cynorm.batch_norm(x4(), weight=np.ones(2), training=True),
     ValueError, r"weight"),
    ("bn-bias-shape", lambda: cynorm.batch_norm(x4(), bias=np.ones(8), training=True),
     ValueError, r"bias"),
    ("bn-eps-negative", lambda: cynorm.batch_norm(x4(), training=True, eps=-1.0),
     ValueError, r"eps"),
    ("bn-stats-unknown", lambda: cynorm.batch_norm(x4(), training=True, stats="x"),
     ValueError, r"stats"),
    ("bn-one-value-per-channel", lambda: cynorm.batch_norm(np.zeros((1, 4)), training=True),
     ValueError, r"(?i)value|channel|\bx\b"),
    ("bn-out-shape", lambda: cynorm.batch_norm(x4(), training=True, out=np.empty((2, 4))),
     ValueError, r"\bout\b"),
    ("bn-out-read-only", lambda: cynorm.batch_norm(
        x4(), training=True, out=read_only(np.empty((2, 4, 3)))), ValueError, r"\bout\b"),
    ("bn-out-partial-overlap", _bn_partial_overlap, ValueError, r"\bout\b"),
    ("bnb-mean-shape", lambda: cynorm.batch_norm_backward(
        x4(), x4(), np.zeros(3), np.ones(4)), ValueError, r"\bmean\b"),
    ("bnb-rstd-shape", lambda: cynorm.batch_norm_backward(
        x4(), x4(), np.zeros(4), np.ones((2, 4))), ValueError, r"\brstd\b"),
    ("bnb-dy-shape", lambda: cynorm.batch_norm_backward(
        np.zeros((2, 4, 2)), x4(), np.zeros(4), np.ones(4)), ValueError, r"\bdy\b"),
    ("bnb-weight-shape", lambda: cynorm.batch_norm_backward(
        x4(), x4(), np.zeros(4), np.ones(4), np.ones(3)), ValueError, r"weight"),
    ("bnb-out-dtype", lambda: cynorm.batch_norm_backward(
        x4(), x4(), np.zeros(4), np.ones(4), out=np.empty((2, 4, 3), np.float32)),
     (TypeError, ValueError), r"\bout\b"),
    # ---- layer_norm ----
    ("ln-ns-mismatch", lambda: cynorm.layer_norm(x4(), 5), ValueError,
     r"normalized_shape"),
    ("ln-ns-tuple-mismatch", lambda: cynorm.layer_norm(x4(), (3, 3)), ValueError,
     r"normalized_shape"),
    ("ln-ns-too-long", lambda: cynorm.layer_norm(x4(), (1, 2, 4, 3)), ValueError,
     r"normalized_shape|\bx\b"),
    ("ln-ns-empty", lambda: cynorm.layer_norm(x4(), ()), ValueError,
     r"normalized_shape"),
    ("ln-ns-zero", lambda: cynorm.layer_norm(x4(), 0), ValueError, r"normalized_shape"),
    ("ln-ns-negative", lambda: cynorm.layer_norm(x4(), -3), ValueError,
     r"normalized_shape"),
    ("ln-ns-float", lambda: cynorm.layer_norm(x4(), 3.0), TypeError, r"normalized_shape"),
    ("ln-ns-tuple-of-float", lambda: cynorm.layer_norm(x4(), (3.0,)), TypeError,
     r"normalized_shape"),
    ("ln-ns-str", lambda: cynorm.layer_norm(x4(), "3"), TypeError, r"normalized_shape"),
    ("ln-ns-none", lambda: cynorm.layer_norm(x4(), None), TypeError, r"normalized_shape"),
    ("ln-x-int", lambda: cynorm.layer_norm(np.zeros((2, 3), int), 3), TypeError,
     r"\bx\b"),
    ("ln-x-uint16", lambda: cynorm.layer_norm(np.zeros((2, 3), np.uint16), 3),
     TypeError, r"\bx\b.*uint16"),
    ("ln-weight-shape", lambda: cynorm.layer_norm(x4(), 3, np.ones(4)), ValueError,
     r"weight"),
    ("ln-weight-shape-2d", lambda: cynorm.layer_norm(x4(), 3, np.ones((4, 3))), ValueError,
     r"weight"),
    ("ln-bias-shape", lambda: cynorm.layer_norm(x4(), (4, 3), None, np.ones(3)),
     ValueError, r"bias"),
    ("ln-eps-negative", lambda: cynorm.layer_norm(x4(), 3, eps=-1e-5), ValueError, r"eps"),
    ("ln-stats-unknown", lambda: cynorm.layer_norm(x4(), 3, stats="fast"), ValueError,
     r"stats"),
    ("ln-out-shape", lambda: cynorm.layer_norm(x4(), 3, out=np.empty((2, 4))), ValueError,
     r"\bout\b"),
    ("ln-out-non-contiguous", lambda: cynorm.layer_norm(
        x4(), 3, out=np.empty((2, 4, 6))[..., ::2]), ValueError, r"\bout\b"),
    ("ln-out-partial-overlap", _ln_partial_overlap, ValueError, r"\bout\b"),
    ("lnb-mean-shape", lambda: cynorm.layer_norm_backward(
        x4(), x4(), np.zeros(2), np.ones((2, 4)), 3), ValueError, r"\bmean\b"),
    ("lnb-rstd-shape", lambda: cynorm.layer_norm_backward(
        x4(), x4(), np.zeros((2, 4)), np.ones((2, 3)), 3), ValueError, r"\brstd\b"),
    ("lnb-dy-shape", lambda: cynorm.layer_norm_backward(
        np.zeros((2, 4, 2)), x4(), np.zeros((2, 4)), np.ones((2, 4)), 3), ValueError,
     r"\bdy\b"),
    ("lnb-ns-mismatch", lambda: cynorm.layer_norm_backward(
        x4(), x4(), np.zeros((2, 4)), np.ones((2, 4)), 4), ValueError,
     r"normalized_shape"),
    ("lnb-weight-shape", lambda: cynorm.layer_norm_backward(
        x4(), x4(), np.zeros((2, 4)), np.ones((2, 4)), 3, np.ones(4)), ValueError,
     r"weight"),
    # ---- rms_norm ----
    ("rms-ns-mismatch", lambda: cynorm.rms_norm(x4(), 4), ValueError, r"normalized_shape"),
    ("rms-ns-empty", lambda: cynorm.rms_norm(x4(), []), ValueError, r"normalized_shape"),
    ("rms-ns-float", lambda: cynorm.rms_norm(x4(), 3.5), TypeError, r"normalized_shape"),
    ("rms-x-complex", lambda: cynorm.rms_norm(np.zeros((2, 3), complex), 3), TypeError,
     r"\bx\b"),
    ("rms-x-int16", lambda: cynorm.rms_norm(np.zeros((2, 3), np.int16), 3),
     TypeError, r"\bx\b.*int16"),
    ("rms-weight-shape", lambda: cynorm.rms_norm(x4(), 3, np.ones(2)), ValueError,
     r"weight"),
    ("rms-eps-negative", lambda: cynorm.rms_norm(x4(), 3, eps=-1.0), ValueError, r"eps"),
    ("rms-eps-str", lambda: cynorm.rms_norm(x4(), 3, eps="tiny"), TypeError, r"eps"),
    ("rms-out-read-only", lambda: cynorm.rms_norm(x4(), 3, out=read_only(x4())),
     ValueError, r"\bout\b"),
    ("rms-out-partial-overlap", _rms_partial_overlap, ValueError, r"\bout\b"),
    ("rmsb-rstd-shape", lambda: cynorm.rms_norm_backward(
        x4(), x4(), np.ones((2, 3)), 3), ValueError, r"\brstd\b"),
    ("rmsb-dy-shape", lambda: cynorm.rms_norm_backward(
        np.zeros((2, 4)), x4(), np.ones((2, 4)), 3), ValueError, r"\bdy\b"),
    ("rmsb-weight-shape", lambda: cynorm.rms_norm_backward(
        x4(), x4(), np.ones((2, 4)), 3, np.ones((1, 3))), ValueError, r"weight"),
    ("rmsb-out-shape", lambda: cynorm.rms_norm_backward(
        x4(), x4(), np.ones((2, 4)), 3, out=np.empty(24)), ValueError, r"\bout\b"),
    # ---- numbers too large for a float, flags that are arrays, absurd group counts ----
    ("gn-eps-huge-int", lambda: cynorm.group_norm(x4(), 2, eps=10 ** 400), ValueError,
     r"\beps\b"),
    ("in-eps-huge-int", lambda: cynorm.instance_norm(x4(), eps=10 ** 400), ValueError,
     r"\beps\b"),
    ("bn-eps-huge-int", lambda: cynorm.batch_norm(x4(), training=True, eps=10 ** 400),
     ValueError, r"\beps\b"),
    ("bn-eval-eps-huge-int", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), np.ones(4), eps=-10 ** 400), ValueError, r"\beps\b"),
    ("ln-eps-huge-int", lambda: cynorm.layer_norm(x4(), 3, eps=10 ** 400), ValueError,
     r"\beps\b"),
    ("rms-eps-huge-int", lambda: cynorm.rms_norm(x4(), 3, eps=10 ** 400), ValueError,
     r"\beps\b"),
    ("bn-momentum-huge-int", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), np.ones(4), training=True, momentum=10 ** 400), ValueError,
     r"\bmomentum\b"),
    ("in-momentum-huge-int", lambda: cynorm.instance_norm(
        x4(), np.zeros(4), np.ones(4), momentum=10 ** 400), ValueError, r"\bmomentum\b"),
    ("in-momentum-out-of-range", lambda: cynorm.instance_norm(
        x4(), np.zeros(4), np.ones(4), momentum=1.5), ValueError, r"\bmomentum\b"),
    ("bn-training-array", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), np.ones(4), training=np.array([1, 0])), TypeError,
     r"\btraining\b"),
    ("bn-training-str", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), np.ones(4), training="yes"), TypeError, r"\btraining\b"),
    ("bn-training-two", lambda: cynorm.batch_norm(
        x4(), np.zeros(4), np.ones(4), training=2), TypeError, r"\btraining\b"),
    ("bnb-training-array", lambda: cynorm.batch_norm_backward(
        x4(), x4(), np.zeros(4), np.ones(4), training=np.array([1, 0])), TypeError,
     r"\btraining\b"),
    ("in-use-input-stats-array", lambda: cynorm.instance_norm(
        x4(), use_input_stats=np.array([True, False])), TypeError, r"\buse_input_stats\b"),
    ("inb-use-input-stats-array", lambda: cynorm.instance_norm_backward(
        x4(), x4(), *stats(2, 4), use_input_stats=np.array([1, 0])), TypeError,
     r"\buse_input_stats\b"),
    ("gn-groups-huge-no-channels", lambda: cynorm.group_norm(
        np.zeros((2, 0, 3)), 2 ** 62), ValueError, r"\bnum_groups\b"),
    ("gnb-groups-huge-no-channels", lambda: cynorm.group_norm_backward(
        np.zeros((2, 0, 3)), np.zeros((2, 0, 3)), np.zeros((2, 1)), np.ones((2, 1)), 2 ** 62),
     ValueError, r"\bnum_groups\b"),
    ("gn-groups-bool", lambda: cynorm.group_norm(x4(), True), TypeError, r"\bnum_groups\b"),
    # ---- instance_norm's running statistics ----
    ("in-running-mean-alone", lambda: cynorm.instance_norm(x4(), np.zeros(4)), ValueError,
     r"running_mean and running_var"),
    ("in-running-var-alone", lambda: cynorm.instance_norm(x4(), None, np.ones(4)),
     ValueError, r"running_mean and running_var"),
    ("in-running-stats-required", lambda: cynorm.instance_norm(
        x4(), use_input_stats=False), ValueError, r"running_mean and running_var"),
    ("in-running-mean-shape", lambda: cynorm.instance_norm(
        x4(), np.zeros(3), np.ones(4)), ValueError, r"\brunning_mean\b"),
    ("in-running-var-int", lambda: cynorm.instance_norm(
        x4(), np.zeros(4), np.ones(4, int)), TypeError, r"\brunning_var\b"),
    ("in-running-mean-list", lambda: cynorm.instance_norm(
        x4(), [0.0] * 4, np.ones(4)), TypeError, r"\brunning_mean\b"),
    ("in-running-var-read-only", lambda: cynorm.instance_norm(
        x4(), np.zeros(4), read_only(np.ones(4))), ValueError, r"\brunning_var\b"),
    ("in-running-stats-one-spatial-element", lambda: cynorm.instance_norm(
        np.ones((2, 4, 1)), np.zeros(4), np.ones(4)), ValueError, r"spatial"),
    ("inb-running-stats-shape", lambda: cynorm.instance_norm_backward(
        x4(), x4(), np.zeros((2, 4)), np.ones((2, 4)), use_input_stats=False), ValueError,
     r"\bmean\b"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_argument_raises_naming_it(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_eval_batch_norm_with_one_value_per_channel_is_allowed():
    # the one-value restriction is for training only: eval uses the running stats
    y = cynorm.batch_norm(np.full((1, 3), 2.0), np.ones(3), np.full(3, 4.0), eps=0.0)
    np.testing.assert_allclose(y, np.full((1, 3), 0.5))


@pytest.mark.parametrize("momentum", [5.0, -1.0, float("nan"), float("inf"), None, "fast",
                                      10 ** 400, np.array([0.1, 0.2])])
def test_momentum_is_ignored_when_not_training(momentum):
    """torch ignores momentum in eval (training=False / use_input_stats=False): any value
    is accepted and the result is that of the default."""
    x, rm, rv = x4(), np.linspace(-1, 1, 4), np.linspace(0.5, 2, 4)
    expected = (x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5)
    np.testing.assert_allclose(cynorm.batch_norm(x, rm, rv, momentum=momentum), expected,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        cynorm.instance_norm(x, rm, rv, use_input_stats=False, momentum=momentum), expected,
        rtol=1e-12, atol=1e-12)


def test_flags_accept_bools_and_zero_or_one():
    x, rm, rv = x4(), np.zeros(4), np.ones(4)
    for flag in (False, np.False_, 0):
        np.testing.assert_array_equal(cynorm.batch_norm(x, rm, rv, training=flag),
                                      cynorm.batch_norm(x, rm, rv, training=False))
    for flag in (True, np.True_, 1):
        np.testing.assert_array_equal(cynorm.instance_norm(x, use_input_stats=flag),
                                      cynorm.instance_norm(x))


def test_failed_instance_norm_leaves_running_stats_untouched():
    x = x4()
    rm, rv = np.zeros(4), np.ones(4)
    for bad in (dict(weight=np.ones(5)), dict(momentum=2.0), dict(out=read_only(x)),
                dict(eps=-1.0), dict(stats="fast")):
        with pytest.raises((TypeError, ValueError)):
            cynorm.instance_norm(x, rm, rv, **bad)
        np.testing.assert_array_equal(rm, 0.0)
        np.testing.assert_array_equal(rv, 1.0)


def test_failed_call_leaves_out_and_running_stats_untouched():
    x = x4()
    out = np.full((2, 4, 3), 7.0)
    with pytest.raises(ValueError):
        cynorm.group_norm(x, 3, out=out)
    np.testing.assert_array_equal(out, 7.0)
    rm, rv = np.zeros(4), np.ones(4)
    with pytest.raises(ValueError):
        cynorm.batch_norm(x, rm, rv, weight=np.ones(5), training=True)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


def test_non_contiguous_running_stats_are_updated_or_rejected():
    # running stats are updated in place: a strided view must either be updated
    # correctly or be refused, never silently left unchanged through a hidden copy
    x = np.random.default_rng(3).standard_normal((5, 4, 3))
    buf_m, buf_v = np.zeros(8), np.ones(8)
    rm, rv = buf_m[::2], buf_v[::2]
    try:
        cynorm.batch_norm(x, rm, rv, training=True, momentum=0.5)
    except ValueError as e:
        assert "running_" in str(e)
        return
    xc = np.moveaxis(x, 1, 0).reshape(4, -1)
    np.testing.assert_allclose(rm, 0.5 * xc.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(rv, 0.5 + 0.5 * xc.var(axis=1, ddof=1), rtol=1e-12)
    np.testing.assert_array_equal(buf_m[1::2], 0.0)  # the gaps are not written


def test_valid_edge_arguments_are_accepted():
    # the boundaries of the checks above are legal values
    x = x4()
    cynorm.group_norm(x, 4, eps=0.0)
    cynorm.group_norm(x, np.int64(2))
    cynorm.batch_norm(x, np.zeros(4), np.ones(4), training=True, momentum=0.0)
    cynorm.batch_norm(x, np.zeros(4), np.ones(4), training=True, momentum=1.0)
    y = cynorm.layer_norm(x, (2, 4, 3))
    assert y.shape == x.shape
    ok = cynorm.rms_norm(x, [4, 3], eps=0.0)
    assert np.isfinite(ok).all()


def test_read_only_inputs_are_accepted_by_every_op():
    rng = np.random.default_rng(5)

    def ro(shape):
        a = rng.standard_normal(shape) + 2.0
        a.flags.writeable = False
        return a

    x, dy = ro((4, 3, 5)), ro((4, 3, 5))
    w, b = ro(3), ro(3)
    y, m, r = cynorm.batch_norm(x, None, None, w, b, training=True, return_stats=True)
    m.flags.writeable = r.flags.writeable = False
    cynorm.batch_norm_backward(dy, x, m, r, w)
    cynorm.batch_norm(x, ro(3), np.abs(ro(3)), w, b, training=False)  # eval: not written
    w5, b5 = ro(5), ro(5)
    y, m, r = cynorm.layer_norm(x, 5, w5, b5, return_stats=True)
    m.flags.writeable = r.flags.writeable = False
    cynorm.layer_norm_backward(dy, x, m, r, 5, w5)
    y, r = cynorm.rms_norm(x, 5, w5, return_stats=True)
    r.flags.writeable = False
    dx, dw = cynorm.rms_norm_backward(dy, x, r, 5, w5)
    assert np.isfinite(dx).all() and np.isfinite(dw).all()
