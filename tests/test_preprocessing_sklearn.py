"""cynorm.preprocessing.StandardScaler passes scikit-learn's estimator checks.

Every check of sklearn.utils.estimator_checks runs; none is expected to fail. Checks
that do not apply are skipped by scikit-learn itself: array-API input (cynorm's
kernels take NumPy arrays only), sample_weight (fit takes none), pandas/polars output
(when those are not installed). Sparse input is not supported: the checks verify that
it raises a TypeError that says so.
"""
import pytest

pytest.importorskip("sklearn")

from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from cynorm.preprocessing import StandardScaler  # noqa: E402


@parametrize_with_checks([StandardScaler(), StandardScaler(with_mean=False),
                          StandardScaler(with_std=False)])
def test_sklearn_estimator_check(estimator, check):
    check(estimator)
