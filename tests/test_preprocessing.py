"""cynorm.preprocessing.StandardScaler: scikit-learn's StandardScaler semantics, exact
streaming statistics (partial_fit equals one fit on the concatenation to float64
rounding), in-place transform, dtypes, bad input, and the estimator without
scikit-learn installed. scikit-learn's check_estimator: test_preprocessing_sklearn.py."""
import os
import subprocess
import sys

import numpy as np
import pytest

from cynorm.preprocessing import StandardScaler


def offset_data(shape, dtype=np.float64, seed=0, loc=1e4):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 10.0, shape[1])
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def exact_moments(X):
    """mean and biased variance per column in extended precision (long double), from
    the textbook two-pass formulas: the reference."""
    Xl = np.asarray(X, dtype=np.longdouble)
    mean = Xl.sum(axis=0) / Xl.shape[0]
    var = ((Xl - mean) ** 2).sum(axis=0) / Xl.shape[0]
    return mean, var


def test_fit_statistics_match_the_exact_moments(dtype):
    X = offset_data((5000, 7), dtype)
    sc = StandardScaler().fit(X)
    mean, var = exact_moments(X)
    np.testing.assert_allclose(sc.mean_, mean.astype(float), rtol=1e-15)
    # float64 summation of 5000 squared deviations: a few hundred ulps at most
    np.testing.assert_allclose(sc.var_, var.astype(float), rtol=1e-12)
    np.testing.assert_allclose(sc.scale_, np.sqrt(var.astype(float)), rtol=1e-12)
    assert sc.n_samples_seen_ == 5000 and sc.n_features_in_ == 7
    assert sc.mean_.dtype == np.float64


@pytest.mark.parametrize("with_mean,with_std", [(True, True), (False, True),
                                                (True, False), (False, False)])
def test_matches_sklearn_standard_scaler(dtype, with_mean, with_std):
    skp = pytest.importorskip("sklearn.preprocessing")
    X = offset_data((300, 6), dtype, loc=5.0)
    X[:, 2] = 3.0  # a constant feature: scale_ 1
    ours = StandardScaler(with_mean=with_mean, with_std=with_std)
    theirs = skp.StandardScaler(with_mean=with_mean, with_std=with_std)
    yo, yt = ours.fit_transform(X), theirs.fit_transform(X)
    assert yo.dtype == yt.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(yo, yt, rtol=0, atol=tol)
    for name in ("mean_", "var_", "scale_"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert ours.n_samples_seen_ == theirs.n_samples_seen_
    Z = offset_data((20, 6), dtype, seed=1, loc=5.0)
    np.testing.assert_allclose(ours.transform(Z), theirs.transform(Z), atol=tol * 10)
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(Z)), Z, rtol=0,
                               atol=1e-5 if dtype == np.float32 else 1e-13)


def test_transform_is_x_minus_mean_over_scale():
    X = offset_data((400, 5), loc=3.0)
    Z = offset_data((50, 5), seed=3, loc=3.0)
    sc = StandardScaler().fit(X)
    np.testing.assert_allclose(sc.transform(Z), (Z - X.mean(0)) / X.std(0), atol=1e-13)


@pytest.mark.parametrize("sizes", [[1000] * 10, [1, 2, 3, 997, 5000, 1, 3996],
                                   [7] * 300])
def test_partial_fit_stream_equals_one_fit_on_the_concatenation(sizes):
    X = offset_data((sum(sizes), 8))
    stream = StandardScaler()
    start = 0
    for n in sizes:
        stream.partial_fit(X[start:start + n])
        start += n
    whole = StandardScaler().fit(X)
    mean, var = exact_moments(X)
    assert stream.n_samples_seen_ == whole.n_samples_seen_ == X.shape[0]
    # float64 rounding of the exact values, on data with mean 1e4 and spread ~1
    np.testing.assert_allclose(stream.mean_, mean.astype(float), rtol=1e-15)
    np.testing.assert_allclose(stream.var_, var.astype(float), rtol=1e-12)
    np.testing.assert_allclose(stream.mean_, whole.mean_, rtol=1e-15)
    np.testing.assert_allclose(stream.var_, whole.var_, rtol=1e-12)


def test_partial_fit_float32_batches_give_float64_statistics():
    X = offset_data((6000, 4), np.float32)
    sc = StandardScaler()
    for k in range(0, 6000, 1000):
        sc.partial_fit(X[k:k + 1000])
    mean, var = exact_moments(X)
    np.testing.assert_allclose(sc.mean_, mean.astype(float), rtol=1e-15)
    np.testing.assert_allclose(sc.var_, var.astype(float), rtol=1e-12)


def test_fit_restarts_the_statistics():
    sc = StandardScaler().partial_fit(offset_data((50, 3)))
    X = offset_data((40, 3), seed=5)
    sc.fit(X)
    assert sc.n_samples_seen_ == 40
    np.testing.assert_allclose(sc.mean_, X.mean(0), rtol=1e-15)


def test_copy_false_transforms_in_place_and_copy_true_does_not(dtype):
    X = offset_data((100, 4), dtype)
    keep = X.copy()
    sc = StandardScaler().fit(X)
    Y = sc.transform(X)
    np.testing.assert_array_equal(X, keep)
    assert not np.shares_memory(X, Y)
    Z = sc.transform(X, copy=False)
    assert Z is X
    np.testing.assert_array_equal(Z, Y)
    sc2 = StandardScaler(copy=False)
    X2 = keep.copy()
    assert sc2.fit_transform(X2) is X2
    np.testing.assert_array_equal(X2, Y)


def test_read_only_input_is_not_written_even_with_copy_false():
    X = offset_data((30, 3))
    X.flags.writeable = False
    Y = StandardScaler(copy=False).fit(X).transform(X)
    assert Y is not X and not X.flags.writeable


def test_integers_and_lists_become_float64():
    sc = StandardScaler()
    Y = sc.fit_transform([[1, 2], [3, 5], [5, 11]])
    assert Y.dtype == np.float64
    np.testing.assert_allclose(Y.mean(0), 0, atol=1e-15)


def test_sparse_input_is_a_type_error():
    sparse = pytest.importorskip("scipy.sparse")
    X = sparse.csr_matrix(np.eye(3))
    with pytest.raises(TypeError, match="(?i)sparse"):
        StandardScaler().fit(X)


@pytest.mark.parametrize("bad,exc", [(np.array([1.0, np.nan])[None, :].repeat(3, 0),
                                      ValueError),
                                     (np.array([[np.inf, 1.0]]), ValueError),
                                     (np.ones(5), ValueError),
                                     (np.ones((0, 3)), ValueError)])
def test_bad_input_raises_a_clear_error(bad, exc):
    with pytest.raises(exc):
        StandardScaler().fit(bad)


def test_transform_checks_the_number_of_features_and_fitting():
    sc = StandardScaler()
    with pytest.raises(ValueError, match="fit"):  # NotFittedError is a ValueError
        sc.transform(np.ones((2, 3)))
    sc.fit(np.ones((4, 3)))
    with pytest.raises(ValueError, match="3 features"):
        sc.transform(np.ones((2, 4)))
    with pytest.raises(ValueError, match="3 features"):
        sc.partial_fit(np.ones((2, 4)))


WITHOUT_SKLEARN = r"""
import sys
sys.modules["sklearn"] = None   # import sklearn raises ImportError
import numpy as np
from cynorm import preprocessing
from cynorm.preprocessing import StandardScaler
assert not preprocessing.HAVE_SKLEARN
rng = np.random.default_rng(0)
X = 50 + rng.standard_normal((200, 3))
sc = StandardScaler()
for k in range(0, 200, 50):
    sc.partial_fit(X[k:k + 50])
np.testing.assert_allclose(sc.mean_, X.mean(0), rtol=1e-14)
np.testing.assert_allclose(sc.var_, X.var(0), rtol=1e-12)
np.testing.assert_allclose(sc.fit_transform(X), (X - X.mean(0)) / X.std(0), atol=1e-12)
np.testing.assert_allclose(sc.inverse_transform(sc.transform(X)), X, rtol=1e-14)
assert sc.get_params() == {"copy": True, "with_mean": True, "with_std": True}
assert sc.set_params(with_mean=False).with_mean is False
assert repr(sc) == "StandardScaler(copy=True, with_mean=False, with_std=True)"
assert list(sc.get_feature_names_out()) == ["x0", "x1", "x2"]
for bad, exc in [(np.ones(3), ValueError), (np.array([["a"]]), ValueError),
                 (np.array([[np.nan]]), ValueError)]:
    try:
        StandardScaler().fit(bad)
    except exc:
        pass
    else:
        raise AssertionError(f"no {exc.__name__} for {bad!r}")
try:
    StandardScaler().transform(X)
except ValueError as e:
    assert "not fitted" in str(e)
else:
    raise AssertionError("transform before fit")
try:
    sc.transform(np.ones((2, 4)))
except ValueError as e:
    assert "3 features" in str(e)
else:
    raise AssertionError("wrong number of features")
try:
    sc.set_params(bogus=1)
except ValueError:
    pass
else:
    raise AssertionError("set_params(bogus=1)")
try:
    import scipy.sparse
except ImportError:
    pass
else:
    try:
        sc.fit(scipy.sparse.csr_matrix(np.eye(3)))
    except TypeError as e:
        assert "sparse" in str(e)
    else:
        raise AssertionError("sparse input")
print("ok")
"""


def test_works_without_sklearn_installed():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", WITHOUT_SKLEARN], capture_output=True,
                       text=True, env=env, cwd=root)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_statistics_of_far_offset_data_keep_their_digits(dtype):
    """Features at 1e6 +- (0.1 .. 10): fit and a stream of 1000-row batches both give
    the variance to a few ulps (moments are kept relative to a per-feature shift; merging
    unshifted batch means lost ~1e-12 here, scikit-learn's partial_fit ~1e-11)."""
    X = offset_data((60000, 6), dtype, loc=1e6)
    mean, var = exact_moments(X)
    whole = StandardScaler().fit(X)
    stream = StandardScaler()
    for k in range(0, X.shape[0], 1000):
        stream.partial_fit(X[k:k + 1000])
    for sc in (whole, stream):
        np.testing.assert_allclose(sc.mean_, mean.astype(float), rtol=1e-15)
        np.testing.assert_allclose(sc.var_, var.astype(float), rtol=2e-14)


# ---- float16 and bfloat16 ----------------------------------------------------------------

from lowp_reference import LOWP, assert_within_one_ulp, wide  # noqa: E402


def lowp_data(shape, dt, seed=0, loc=2.0):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 4.0, shape[1])
    return (loc + scale * rng.standard_normal(shape)).astype(dt)


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_16bit_keeps_its_dtype_within_one_ulp_with_float64_statistics(dt):
    X = lowp_data((3000, 5), dt)
    sc = StandardScaler()
    Y = sc.fit_transform(X)
    mean, var = exact_moments(wide(X))
    assert Y.dtype == dt and sc.mean_.dtype == sc.var_.dtype == np.float64
    np.testing.assert_allclose(sc.mean_, mean.astype(float), rtol=1e-15)
    np.testing.assert_allclose(sc.var_, var.astype(float), rtol=1e-12)
    exact = (wide(X) - mean.astype(float)) / np.sqrt(var.astype(float))
    assert_within_one_ulp(Y, exact)
    Z = lowp_data((40, 5), dt, seed=1)
    assert_within_one_ulp(sc.transform(Z), (wide(Z) - sc.mean_) / sc.scale_)
    # inverse: y * scale + mean, near 0 a few float32 ulps of the terms
    back = sc.inverse_transform(Y)
    terms = np.abs(wide(Y) * sc.scale_) + np.abs(sc.mean_)
    assert back.dtype == dt
    assert_within_one_ulp(back, wide(Y) * sc.scale_ + sc.mean_, terms=terms)


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_16bit_partial_fit_stream_equals_one_fit(dt):
    X = lowp_data((5000, 4), dt, seed=2)
    stream = StandardScaler()
    for k in range(0, 5000, 700):
        stream.partial_fit(X[k:k + 700])
    mean, var = exact_moments(wide(X))
    np.testing.assert_allclose(stream.mean_, mean.astype(float), rtol=1e-15)
    np.testing.assert_allclose(stream.var_, var.astype(float), rtol=1e-12)


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_16bit_copy_false_transforms_in_place_and_copy_true_does_not(dt):
    X = lowp_data((100, 4), dt, seed=3)
    keep = X.copy()
    sc = StandardScaler().fit(X)
    Y = sc.transform(X)
    assert np.array_equal(X.view(np.uint16), keep.view(np.uint16))
    assert Y.dtype == dt and not np.shares_memory(X, Y)
    Z = sc.transform(X, copy=False)
    assert Z is X and np.array_equal(Z.view(np.uint16), Y.view(np.uint16))
    X.flags.writeable = False
    W = sc.transform(X, copy=False)
    assert W is not X and W.dtype == dt


def test_16bit_nan_is_an_error_and_other_dtypes_are_not_16bit():
    X = lowp_data((10, 2), np.float16)
    X[3, 1] = np.nan
    with pytest.raises(ValueError, match="(?i)nan"):
        StandardScaler().fit(X)
    # integers still become float64 (not a 16-bit float)
    assert StandardScaler().fit_transform(np.arange(6, dtype=np.int16).reshape(3, 2)
                                          ).dtype == np.float64
