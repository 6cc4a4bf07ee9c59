"""cynorm.dask: every op on Dask arrays chunked along any axes equals cynorm on the
array in memory (float64 to 1e-12, float32 within 1 ulp), lazily, and bitwise the same
across runs and schedulers (threads, synchronous, a distributed LocalCluster)."""
import concurrent.futures
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import cynorm  # noqa: E402
import cynorm.dask as cd  # noqa: E402

SHAPE = (5, 6, 7, 9)
TIMEOUT_S = 240  # for the tests that start a LocalCluster

CHUNKINGS = [
    SHAPE,                               # one chunk
    (2, 6, 7, 9),                        # along N
    (5, 4, 7, 9),                        # along C, across group boundaries
    (5, 6, 3, 4),                        # along the spatial axes
    ((1, 4), (1, 2, 3), (7,), (2, 2, 5)),  # every axis, irregular
    (1, 1, 1, 9),                        # many small chunks
]


def data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (1.5 + 2.0 * rng.standard_normal(shape)).astype(dtype)


def _params(dtype, seed=1):
    rng = np.random.default_rng(seed)
    C, tail = SHAPE[1], SHAPE[2:]
    return ((1 + 0.3 * rng.standard_normal(C)).astype(dtype),
            (0.3 * rng.standard_normal(C)).astype(dtype),
            (1 + 0.3 * rng.standard_normal(tail)).astype(dtype),
            (0.3 * rng.standard_normal(tail)).astype(dtype))


def ops(dtype):
    """(name, dask call, in-memory call) for every op, with affine parameters."""
    w, b, lw, lb = _params(dtype)
    return [
        ("batch_norm", lambda X: cd.batch_norm(X, weight=w, bias=b, training=True),
         lambda x: cynorm.batch_norm(x, weight=w, bias=b, training=True)),
        ("group_norm", lambda X: cd.group_norm(X, 3, w, b),
         lambda x: cynorm.group_norm(x, 3, w, b)),
        ("group_norm_1", lambda X: cd.group_norm(X, 1, w, b),
         lambda x: cynorm.group_norm(x, 1, w, b)),
        ("instance_norm", lambda X: cd.instance_norm(X, weight=w, bias=b),
         lambda x: cynorm.instance_norm(x, weight=w, bias=b)),
        ("layer_norm", lambda X: cd.layer_norm(X, SHAPE[2:], lw, lb),
         lambda x: cynorm.layer_norm(x, SHAPE[2:], lw, lb)),
        ("layer_norm_last", lambda X: cd.layer_norm(X, SHAPE[-1], lw[0], lb[0]),
         lambda x: cynorm.layer_norm(x, SHAPE[-1], lw[0], lb[0])),
        ("rms_norm", lambda X: cd.rms_norm(X, SHAPE[2:], lw, eps=1e-5),
         lambda x: cynorm.rms_norm(x, SHAPE[2:], lw, eps=1e-5)),
    ]


def assert_matches(actual, expected):
    """float64: 1e-12; float32: within 1 ulp of the in-memory result."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if expected.dtype == np.float64:
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)
    else:
        ulp = np.spacing(np.abs(expected))
        assert np.all(np.abs(actual.astype(np.float64) - expected) <= ulp), \
            np.max(np.abs(actual.astype(np.float64) - expected) / ulp)


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=str)
def test_every_op_on_any_chunking_equals_cynorm_in_memory(dtype, chunks):
    x = data(SHAPE, dtype)
    X = da.from_array(x, chunks=chunks)
    for name, lazy, eager in ops(dtype):
        Y = lazy(X)
        assert isinstance(Y, da.Array) and Y.chunks == X.chunks, name
        assert_matches(Y.compute(scheduler="synchronous"), eager(x))


def test_statistics_returned_lazily_equal_the_in_memory_ones():
    x = data(SHAPE, np.float64, seed=2)
    X = da.from_array(x, chunks=((1, 4), (1, 2, 3), (7,), (2, 2, 5)))
    pairs = [
        (cd.batch_norm(X, training=True, return_stats=True),
         cynorm.batch_norm(x, training=True, return_stats=True)),
        (cd.group_norm(X, 2, return_stats=True), cynorm.group_norm(x, 2, return_stats=True)),
        (cd.instance_norm(X, return_stats=True), cynorm.instance_norm(x, return_stats=True)),
        (cd.layer_norm(X, (7, 9), return_stats=True),
         cynorm.layer_norm(x, (7, 9), return_stats=True)),
        (cd.rms_norm(X, 9, return_stats=True), cynorm.rms_norm(x, 9, return_stats=True)),
    ]
    for lazy, eager in pairs:
        computed = dask.compute(*lazy, scheduler="synchronous")
        for a, b in zip(computed, eager):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_batch_norm_in_eval_mode_uses_the_running_statistics():
    x = data(SHAPE, np.float32, seed=3)
    rm = np.linspace(-1, 1, SHAPE[1])
    rv = np.linspace(0.5, 2, SHAPE[1])
    w, b, _, _ = _params(np.float32)
    Y = cd.batch_norm(da.from_array(x, chunks=(2, 4, 3, 4)), rm, rv, w, b)
    assert_matches(Y.compute(), cynorm.batch_norm(x, rm, rv, w, b))


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=str)
def test_batch_norm_backward_equals_cynorm_in_memory(dtype, chunks):
    x = data(SHAPE, dtype, seed=4)
    dy = data(SHAPE, dtype, seed=5)
    w, _, _, _ = _params(dtype)
    X, DY = da.from_array(x, chunks=chunks), da.from_array(dy, chunks=chunks)
    _, mean, rstd = cd.batch_norm(X, weight=w, training=True, return_stats=True)
    _, m0, r0 = cynorm.batch_norm(x, weight=w, training=True, return_stats=True)
    got = dask.compute(*cd.batch_norm_backward(DY, X, mean, rstd, w))
    ref = cynorm.batch_norm_backward(dy, x, m0, r0, w)
    assert_matches(got[0], ref[0])
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=1e-12 if dtype == np.float64 else 1e-5,
                                   atol=1e-12 if dtype == np.float64 else 1e-4)
    # eval mode: constant statistics
    got = dask.compute(*cd.batch_norm_backward(DY, X, m0, r0, w, training=False))
    ref = cynorm.batch_norm_backward(dy, x, m0, r0, w, training=False)
    assert_matches(got[0], ref[0])


def test_any_chunking_property():
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    def chunks_of(n):
        return st.lists(st.integers(1, n), min_size=1, max_size=n).map(
            lambda cuts: _cut(n, cuts))

    x = data(SHAPE, np.float64, seed=6)
    fns = ops(np.float64)
    eager = [f(x) for _, _, f in fns]

    @hypothesis.settings(max_examples=25, deadline=None)
    @hypothesis.given(st.tuples(*(chunks_of(n) for n in SHAPE)))
    def check(chunks):
        X = da.from_array(x, chunks=chunks)
        for (name, lazy, _), ref in zip(fns, eager):
            np.testing.assert_allclose(lazy(X).compute(scheduler="synchronous"), ref,
                                       rtol=1e-12, atol=1e-12, err_msg=name)

    check()


def _cut(n, sizes):
    """Chunk sizes from a list of positive ints: taken in order until they cover n."""
    out, total = [], 0
    for s in sizes:
        s = min(s, n - total)
        if s <= 0:
            break
        out.append(s)
        total += s
    if total < n:
        out.append(n - total)
    return tuple(out)


def _all_results(X):
    """Every op's lazy result on X, float32."""
    return [lazy(X) for _, lazy, _ in ops(np.float32)]


def test_bitwise_identical_across_runs_and_schedulers():
    distributed = pytest.importorskip("distributed")
    x = data((16, 6, 30, 40), np.float32, seed=7)
    X = da.from_array(x, chunks=(3, 4, 11, 40))
    fns = [lambda X: cd.batch_norm(X, training=True),
           lambda X: cd.group_norm(X, 3),
           lambda X: cd.layer_norm(X, (30, 40)),
           lambda X: cd.rms_norm(X, 40)]
    lazy = [f(X) for f in fns]
    base = dask.compute(*lazy, scheduler="synchronous")
    runs = [dask.compute(*lazy, scheduler="threads", num_workers=4),
            dask.compute(*[f(X) for f in fns], scheduler="threads")]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  silence_logs=40) as cluster, \
            distributed.Client(cluster, timeout="60s") as client:
        for arrays in (lazy, [f(X) for f in fns]):  # a hang fails after TIMEOUT_S
            futures = client.compute(arrays)
            distributed.wait(futures, timeout=TIMEOUT_S)
            runs.append(client.gather(futures))
    for run in runs:
        for a, b in zip(run, base):
            assert np.array_equal(a, b)


# ---- bad input --------------------------------------------------------------------------

def test_dask_functions_reject_bad_arguments_by_name():
    x = data((2, 4, 5), np.float64)
    X = da.from_array(x, chunks=2)
    with pytest.raises(TypeError, match="x must be a dask.array.Array"):
        cd.batch_norm(x, training=True)
    for bad in (np.int64, np.int16, np.complex64):
        with pytest.raises(TypeError, match="x must be a float32, float64, float16 or "
                                            "bfloat16 array, got dtype"):
            cd.group_norm(X.astype(bad), 2)
    with pytest.raises(TypeError, match="dy must be a float32, float64, float16 or "
                                        "bfloat16 array"):
        cd.batch_norm_backward(X.astype(np.int16), X, np.zeros(4), np.ones(4))
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        cd.batch_norm_backward(X.astype(np.float16), X, np.zeros(4), np.ones(4))
    with pytest.raises(TypeError, match="weight must be a floating-point array"):
        cd.batch_norm(X.astype(np.float16), weight=da.ones(4, dtype=np.int16),
                      training=True)
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        cd.instance_norm(X[X[:, 0, 0] > 0])
    with pytest.raises(ValueError, match="num_groups"):
        cd.group_norm(X, 3)
    with pytest.raises(TypeError, match="num_groups"):
        cd.group_norm(X, None)
    with pytest.raises(ValueError, match="weight must have shape"):
        cd.batch_norm(X, weight=np.ones(3), training=True)
    with pytest.raises(ValueError, match="running statistics"):
        cd.batch_norm(X, np.zeros(4), np.ones(4), training=True)
    with pytest.raises(ValueError, match="required when training=False"):
        cd.batch_norm(X)
    with pytest.raises(ValueError, match="eps"):
        cd.layer_norm(X, 5, eps=-1.0)
    with pytest.raises(ValueError, match="normalized_shape"):
        cd.layer_norm(X, 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        cd.batch_norm(da.ones((1, 3), chunks=1), training=True)
    with pytest.raises(ValueError, match="dy must have the shape"):
        cd.batch_norm_backward(X[:1], X, np.zeros(4), np.ones(4))


def test_reread_gives_the_same_bits_from_a_second_read_of_the_chunks():
    x = data(SHAPE, np.float32, seed=8)
    X = da.from_array(x, chunks=(2, 3, 7, 9))
    calls = [lambda X, r: cd.batch_norm(X, training=True, reread=r),
             lambda X, r: cd.group_norm(X, 3, reread=r),
             lambda X, r: cd.instance_norm(X, reread=r),
             lambda X, r: cd.layer_norm(X, 9, reread=r),
             lambda X, r: cd.rms_norm(X, 9, reread=r)]
    for f in calls:
        once, twice = f(X, False), f(X, True)
        assert np.array_equal(once.compute(), twice.compute())
        # the apply reads its own copy of x's chunks
        n_x = len(X.dask)
        assert len(twice.dask) >= len(once.dask) + X.npartitions, len(twice.dask)
        assert n_x > 0


def test_out_of_core_example_normalises_a_disk_array_on_a_local_cluster(tmp_path,
                                                                        monkeypatch):
    pytest.importorskip("distributed")
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "dask_out_of_core.py")
    spec = importlib.util.spec_from_file_location("dask_out_of_core", path)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)
    spec.loader.exec_module(example)
    # 40 samples of 2 MiB in chunks of 16: three chunks, the last one short
    # under the sanitizers (scripts/sanitize.sh) memory use means nothing: no limit
    limited = os.environ.get("CYNORM_SANITIZED") != "1"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a hang fails
        job = pool.submit(example.run, gb=40 * 2 ** 21 / 1e9, directory=str(tmp_path),
                          workers=2, memory_limit=int(0.6e9) if limited else 0,
                          chunk_samples=16, check=True, verbose=False)
        r = job.result(timeout=TIMEOUT_S)
    assert r["array_gb"] == pytest.approx(40 * 2 ** 21 / 1e9)
    assert r["max_abs_diff"] <= 1e-5
    assert r["gb_per_s"] > 0 and len(r["peak_worker_memory_gb"]) == 2
    assert r["within_memory_limit"] is (True if limited else None)
    assert os.listdir(tmp_path) == []  # its files are gone


# ---- float16 and bfloat16 ----------------------------------------------------------------

import reference as ref  # noqa: E402
from lowp_reference import LOWP, assert_within_one_ulp, wide  # noqa: E402


def _lowp_ops(pdt):
    """(name, dask call, in-memory call, float64 reference on the widened x, the size of
    the terms y is a sum of) for every op, parameters of dtype pdt."""
    w, b, lw, lb = _params(pdt)
    W, B, LW, LB = wide(w), wide(b), wide(lw), wide(lb)
    ch = (1, -1, 1, 1)

    def terms_ch(y):
        return np.abs(y) + 2 * np.abs(B).reshape(ch)

    return [
        ("batch_norm", lambda X: cd.batch_norm(X, weight=w, bias=b, training=True),
         lambda x: cynorm.batch_norm(x, weight=w, bias=b, training=True),
         lambda x: ref.batch_norm(x, None, None, W, B, training=True)[0], terms_ch),
        ("group_norm", lambda X: cd.group_norm(X, 3, w, b),
         lambda x: cynorm.group_norm(x, 3, w, b),
         lambda x: ref.group_norm(x, 3, W, B)[0], terms_ch),
        ("instance_norm", lambda X: cd.instance_norm(X, weight=w, bias=b),
         lambda x: cynorm.instance_norm(x, weight=w, bias=b),
         lambda x: ref.instance_norm(x, W, B)[0], terms_ch),
        ("layer_norm", lambda X: cd.layer_norm(X, SHAPE[2:], lw, lb),
         lambda x: cynorm.layer_norm(x, SHAPE[2:], lw, lb),
         lambda x: ref.layer_norm(x, SHAPE[2:], LW, LB)[0],
         lambda y: np.abs(y) + 2 * np.abs(LB)),
        ("rms_norm", lambda X: cd.rms_norm(X, SHAPE[2:], lw, eps=1e-5),
         lambda x: cynorm.rms_norm(x, SHAPE[2:], lw, eps=1e-5),
         lambda x: ref.rms_norm(x, SHAPE[2:], LW, eps=1e-5)[0], None),
    ]


@pytest.mark.parametrize("pdt", ["same", np.float32], ids=str)
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("chunks", CHUNKINGS, ids=str)
def test_16bit_every_op_on_any_chunking_within_one_ulp_of_the_reference(dt, pdt, chunks):
    x = data(SHAPE, dt)
    X = da.from_array(x, chunks=chunks)
    for name, lazy, eager, reference, terms in _lowp_ops(dt if pdt == "same" else pdt):
        Y = lazy(X)
        assert isinstance(Y, da.Array) and Y.chunks == X.chunks and Y.dtype == dt, name
        y = Y.compute(scheduler="synchronous")
        e = reference(wide(x))
        assert_within_one_ulp(y, e, terms=None if terms is None else terms(e), what=name)
        if chunks in (SHAPE, (2, 6, 7, 9)) and name not in ("batch_norm",
                                                            "group_norm"):
            # whole sets in every chunk: bitwise the in-memory result
            assert np.array_equal(y.view(np.uint16), eager(x).view(np.uint16)), name


@pytest.mark.parametrize("dt", LOWP, ids=str)
def test_16bit_statistics_are_float64_and_rms_eps_is_the_storage_epsilon(dt):
    x = data(SHAPE, dt, seed=2)
    X = da.from_array(x, chunks=(2, 6, 7, 9))
    y, mean, rstd = dask.compute(*cd.group_norm(X, 2, return_stats=True))
    _, m0, r0 = ref.group_norm(wide(x), 2)
    assert mean.dtype == rstd.dtype == np.float64
    np.testing.assert_allclose(mean, m0, rtol=1e-13)
    np.testing.assert_allclose(rstd, r0, rtol=1e-13)
    y, rstd = dask.compute(*cd.rms_norm(X, 9, return_stats=True))
    eps = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}[np.dtype(dt).name]
    _, r0 = ref.rms_norm(wide(x), 9, eps=eps)
    np.testing.assert_allclose(rstd, r0, rtol=1e-13)
    assert np.array_equal(y.view(np.uint16), cynorm.rms_norm(x, 9).view(np.uint16))


@pytest.mark.parametrize("wdt", [None, "same", np.float32], ids=str)
@pytest.mark.parametrize("dt", LOWP, ids=str)
@pytest.mark.parametrize("chunks", [SHAPE, ((1, 4), (1, 2, 3), (7,), (2, 2, 5))], ids=str)
def test_16bit_batch_norm_backward_within_one_ulp_of_the_reference(dt, wdt, chunks):
    x = data(SHAPE, dt, seed=4)
    dy = data(SHAPE, dt, seed=5)
    w = None if wdt is None else _params(dt if wdt == "same" else wdt)[0]
    X, DY = da.from_array(x, chunks=chunks), da.from_array(dy, chunks=chunks)
    _, mean, rstd = cd.batch_norm(X, weight=w, training=True, return_stats=True)
    dx, dw, db = dask.compute(*cd.batch_norm_backward(DY, X, mean, rstd, w))
    _, m0, r0, _, _ = ref.batch_norm(wide(x), training=True)
    wf = np.ones(SHAPE[1]) if w is None else wide(w)
    edx, edw, edb = ref.batch_norm_backward(wide(dy), wide(x), m0, r0, wf)
    ch = (1, -1, 1, 1)
    xhat = (wide(x) - m0.reshape(ch)) * r0.reshape(ch)
    g = np.abs(wide(dy)) * wf.reshape(ch)
    gmax = g.max(axis=(0, 2, 3), keepdims=True)
    terms = r0.reshape(ch) * (g + gmax + np.abs(xhat) * gmax)
    assert dx.dtype == dt
    assert_within_one_ulp(dx, edx, terms=terms, what="dx")
    assert dw.dtype == db.dtype == (np.float32 if wdt == np.float32 else dt)
    if dw.dtype == np.float32:
        np.testing.assert_allclose(dw, edw, rtol=1e-6, atol=1e-6 * np.abs(edw).max())
        np.testing.assert_allclose(db, edb, rtol=1e-6, atol=1e-6 * np.abs(edb).max())
    else:
        assert_within_one_ulp(dw, edw, terms=np.abs(wide(dy) * xhat).sum((0, 2, 3)),
                              what="dw")
        assert_within_one_ulp(db, edb, terms=np.abs(wide(dy)).sum((0, 2, 3)), what="db")
