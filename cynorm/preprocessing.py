"""scikit-learn-style preprocessing on cynorm's kernels: StandardScaler.

scikit-learn is optional: when it is importable, StandardScaler subclasses its
OneToOneFeatureMixin, TransformerMixin and BaseEstimator (so it works in Pipelines, with
clone, get_params, set_output and get_feature_names_out, and passes check_estimator);
without it, small stand-ins give fit_transform, get_params and set_params.
"""
import inspect

import numpy as np

from cynorm._api import _store, _to_f32
from cynorm._kernels import channel
from cynorm._validate import _contiguous, as_input, is_lowp

try:
    from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
    from sklearn.utils.validation import check_is_fitted, validate_data
    HAVE_SKLEARN = True
except ImportError:  # scikit-learn is not a dependency of cynorm
    HAVE_SKLEARN = False

__all__ = ["StandardScaler"]

_FLOATS = (np.float64, np.float32)
_TWO_PASS = 0


if not HAVE_SKLEARN:
    class NotFittedError(ValueError, AttributeError):
        """The estimator is used before fit (scikit-learn's NotFittedError)."""

    class BaseEstimator:  # type: ignore[no-redef]
        """get_params / set_params from __init__'s keyword arguments."""

        @classmethod
        def _param_names(cls):
            sig = inspect.signature(cls.__init__)
            return sorted(p.name for p in sig.parameters.values() if p.name != "self")

        def get_params(self, deep=True):
            return {name: getattr(self, name) for name in self._param_names()}

        def set_params(self, **params):
            valid = self._param_names()
            for name, value in params.items():
                if name not in valid:
                    raise ValueError(f"Invalid parameter {name!r} for estimator "
                                     f"{type(self).__name__}. Valid parameters are: "
                                     f"{valid!r}.")
                setattr(self, name, value)
            return self

        def __repr__(self):
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
            return f"{type(self).__name__}({args})"

    class TransformerMixin:  # type: ignore[no-redef]
        def fit_transform(self, X, y=None, **fit_params):
            return self.fit(X, y, **fit_params).transform(X)

    class OneToOneFeatureMixin:  # type: ignore[no-redef]
        def get_feature_names_out(self, input_features=None):
            check_is_fitted(self, "n_features_in_")
            if input_features is None:
                return np.asarray([f"x{i}" for i in range(self.n_features_in_)],
                                  dtype=object)
            if len(input_features) != self.n_features_in_:
                raise ValueError("input_features should have length equal to the "
                                 f"number of features ({self.n_features_in_}), got "
                                 f"{len(input_features)}")
            return np.asarray(input_features, dtype=object)

    def check_is_fitted(estimator, attributes=None):
        names = [attributes] if isinstance(attributes, str) else attributes
        if names is None:
            names = ["n_samples_seen_"]
        if not all(hasattr(estimator, a) for a in names):
            raise NotFittedError(f"This {type(estimator).__name__} instance is not "
                                 "fitted yet. Call 'fit' with appropriate arguments "
                                 "before using this estimator.")

    def _is_sparse(X):
        try:
            import scipy.sparse
        except ImportError:
            return False
        return scipy.sparse.issparse(X)

    def validate_data(estimator, X, reset=True, **_):
        """X as a 2-D float32/float64 array without NaN or Inf (ints as float64);
        reset=False: checks its number of features against the fit's."""
        if _is_sparse(X):
            raise TypeError("StandardScaler: sparse input is not supported; pass a "
                            "dense array (X.toarray())")
        try:
            X = np.asarray(X)
        except Exception as e:
            raise ValueError(f"X must be a 2-D array of numbers: {e}") from None
        if X.dtype.kind in "biu":
            X = X.astype(np.float64)
        elif X.dtype.kind != "f":
            raise ValueError(f"X must be a 2-D array of numbers, got dtype {X.dtype}")
        elif X.dtype not in _FLOATS:
            X = X.astype(np.float64)
        if X.ndim != 2:
            raise ValueError(f"Expected a 2-D array, got shape {X.shape}; reshape "
                             "1-D data with X.reshape(-1, 1) (one feature) or "
                             "X.reshape(1, -1) (one sample)")
        if X.shape[0] < 1 or X.shape[1] < 1:
            raise ValueError(f"Found array with shape {X.shape}: at least one sample "
                             "and one feature are required")
        if not np.isfinite(X).all():
            raise ValueError("Input X contains NaN or infinity")
        if reset:
            estimator.n_features_in_ = X.shape[1]
        elif X.shape[1] != estimator.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but "
                             f"{type(estimator).__name__} is expecting "
                             f"{estimator.n_features_in_} features as input.")
        return X


def _owned(Xv, X):
    """Whether the validated Xv is a private copy of the caller's X (then transform may
    write into it whatever `copy` says)."""
    return Xv is not X and Xv.flags.owndata


def _column_moments(X, shift):
    """Per-column mean - shift and m2 = sum((x - mean)**2), float64, of a C-contiguous
    (n, p) float32/float64 array: cynorm's column kernel (corrected two-pass in float64
    of x - shift), statistics only. ddof = n - 1 makes its variance m2 / 1, the exact
    m2."""
    n, p = X.shape
    mean = np.empty(p)
    rstd = np.empty(p)
    m2 = np.empty(p)
    with np.errstate(divide="ignore"):
        channel.forward(X, None, None, None, mean, rstd, m2, n, p, 1, 0.0, _TWO_PASS, 1,
                        float(n - 1), shift)
    return mean, m2


class StandardScaler(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Standardize features: z = (x - mean_) / scale_, per column, as
    sklearn.preprocessing.StandardScaler (dense input; scale_ = sqrt(var_), biased
    variance; features with variance 0 get scale_ 1).

    The statistics are cynorm's: corrected two-pass per column in float64, for float32
    and float64 X alike. partial_fit merges each batch's exact moments (count, mean,
    m2) with Chan's formula, so a stream of batches gives the statistics of one fit on
    their concatenation to float64 rounding. transform applies them with cynorm's
    kernel (in place on X with copy=False when X is a C-contiguous float array).

    Differences from scikit-learn: no sparse input (TypeError), no sample_weight, and
    NaN or Inf in X is an error (scikit-learn ignores NaN in fit). float32, float16 and
    bfloat16 (ml_dtypes.bfloat16) X keep their dtype (16-bit X is computed on an exact
    float32 copy, the result rounded once: within 1 ulp of its dtype); other numbers
    become float64. The statistics are float64 for every dtype.

    Parameters: copy (default True: transform returns a new array), with_mean (subtract
    the mean), with_std (divide by the standard deviation).
    Attributes after fit: mean_ (None if neither with_mean nor with_std), var_ and
    scale_ (None if not with_std), n_samples_seen_, n_features_in_ (and
    feature_names_in_ when X had string column names, with scikit-learn).
    """

    def __init__(self, *, copy=True, with_mean=True, with_std=True):
        self.copy = copy
        self.with_mean = with_mean
        self.with_std = with_std

    if HAVE_SKLEARN:
        def __sklearn_tags__(self):
            tags = super().__sklearn_tags__()
            tags.transformer_tags.preserves_dtype = ["float64", "float32", "float16"]
            return tags

    def _reset(self):
        for name in ("mean_", "var_", "scale_", "n_samples_seen_", "_m2", "_mean",
                     "_mean_shifted", "_shift"):
            if hasattr(self, name):
                delattr(self, name)

    def fit(self, X, y=None):
        """Compute the mean and standard deviation of X (n_samples, n_features)."""
        self._reset()
        return self.partial_fit(X, y)

    def partial_fit(self, X, y=None):
        """Update the statistics with the batch X (n_samples, n_features): Chan's exact
        merge of the batch's count, mean and m2 into the running ones."""
        self._update(self._valid(X, not hasattr(self, "n_samples_seen_"))[0])
        return self

    def fit_transform(self, X, y=None):
        """fit(X).transform(X), validating X once."""
        self._reset()
        Xv, lowp = self._valid(X, True)
        self._update(Xv)
        return self._result(X, Xv, lowp, self.copy)

    def transform(self, X, copy=None):
        """Standardize X with the fitted statistics: (X - mean_) / scale_."""
        check_is_fitted(self, "n_samples_seen_")
        copy = self.copy if copy is None else copy
        Xv, lowp = self._valid(X, False)
        return self._result(X, Xv, lowp, copy)

    def inverse_transform(self, X, copy=None):
        """Undo transform: X * scale_ + mean_ (in X's dtype, with NumPy)."""
        check_is_fitted(self, "n_samples_seen_")
        copy = self.copy if copy is None else copy
        Xv, lowp = self._valid(X, False)
        may_write = lowp is not None or _owned(Xv, X) or not copy
        Y = Xv if (may_write and Xv.flags.writeable) else Xv.copy()
        if self.with_std:
            Y *= self.scale_
        if self.with_mean:
            Y += self._mean
        if lowp is not None:  # from float32, rounded once to X's dtype
            return _store(Y, X if (not copy and X.dtype == lowp and X.flags.writeable)
                          else np.empty(X.shape, dtype=lowp))
        return Y

    def _valid(self, X, reset):
        """X checked (and n_features_in_ set when reset) as a C-contiguous, aligned
        float32/float64 array: X itself when it already is one. A float16 or bfloat16
        ndarray becomes an exact float32 copy (the column kernel reads float32 and
        float64 only; a float32 copy until it takes the 16-bit storages), and its
        native dtype is returned too: (Xv, dtype of the result), the dtype None for
        float32/float64."""
        lowp = None
        if isinstance(X, np.ndarray) and is_lowp(X.dtype):
            X = as_input(X, "X")
            lowp = X.dtype
            X = _to_f32(X)
        Xv = validate_data(self, X, reset=reset, dtype=_FLOATS, order="C",
                           accept_sparse=False, ensure_all_finite=True)
        return _contiguous(Xv), lowp

    def _result(self, X, Xv, lowp, copy):
        """transform of the validated Xv, in X's 16-bit dtype when lowp (rounded once
        from float32; into X itself when copy is False and X is writeable)."""
        if lowp is None:
            return self._apply(Xv, _owned(Xv, X) or not copy)
        Y = self._apply(Xv, True)  # Xv is a private float32 copy
        if not copy and X.dtype == lowp and X.flags.writeable:
            return _store(Y, X)
        return _store(Y, np.empty(X.shape, dtype=lowp))

    def _update(self, X):
        # the running moments are kept relative to a fixed shift per feature (the first
        # sample seen): batch means of shifted data are small, so merging them rounds
        # relative to the data's spread, not to its offset
        nb = X.shape[0]
        first = not hasattr(self, "n_samples_seen_")
        if first:
            self._shift = np.array(X[0], dtype=np.float64)
        mb, qb = _column_moments(X, self._shift)
        if first:
            n, mean, m2 = nb, mb, qb
        else:
            na = self.n_samples_seen_
            n = na + nb
            d = mb - self._mean_shifted
            mean = self._mean_shifted + d * (nb / n)
            m2 = self._m2 + qb + d * d * (na * nb / n)
        self.n_samples_seen_ = n
        self._mean_shifted = mean
        self._m2 = m2
        self._mean = self._shift + mean
        self.mean_ = self._mean.copy() if (self.with_mean or self.with_std) else None
        if self.with_std:
            self.var_ = m2 / n
            scale = np.sqrt(self.var_)
            scale[self.var_ == 0] = 1.0
            self.scale_ = scale
        else:
            self.var_ = None
            self.scale_ = None

    def _apply(self, X, may_write):
        """(X - mean) / scale with cynorm's kernel, into X when may_write allows."""
        Y = X if (may_write and X.flags.writeable) else np.empty_like(X)
        if not (self.with_mean or self.with_std):
            if Y is not X:
                Y[...] = X
            return Y
        p = X.shape[1]
        mean = self._mean if self.with_mean else np.zeros(p)
        rscale = 1.0 / self.scale_ if self.with_std else np.ones(p)
        channel.forward(X, Y, None, None, mean, rscale, mean, X.shape[0], p, 1, 0.0,
                        _TWO_PASS, 0)
        return Y
