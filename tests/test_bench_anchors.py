"""The benchmark's optional anchor columns (ONNX Runtime, OpenVINO, JAX jit).

The column logic is tested without the packages; each anchor's result is checked against
an independent float64 reference only where its package is importable (they are never
dependencies of cynorm). No timing is asserted."""
import sys

import numpy as np
import pytest

from cynorm.bench import anchors, cli, fused, measure, report
from cynorm.bench.suite import TINY_SUITE, Case, make_arrays
import reference as ref


# ---- column logic, no anchor package needed -----------------------------------------

def test_anchor_ratio_columns_follow_torch_and_hide_unstable_rows():
    cols = report.main_columns(["ort", "jax"])
    heads = [h for h, _, _ in cols]
    at = heads.index("torch/cy")
    assert heads[at + 1:at + 3] == ["ORT/cy", "JAX/cy"]
    assert [h for h, _, _ in report.main_columns()] == [h for h, _, _ in
                                                        report.MAIN_COLUMNS]
    ratio = dict((h, key) for h, key, _ in cols)["ORT/cy"]
    assert ratio({"ort_over_cynorm": 3.0}) == 3.0
    assert ratio({"ort_over_cynorm": 3.0, "unstable": "unstable: x"}) is None
    assert ratio({}) is None


def test_anchor_fields_are_other_time_over_cynorm_time():
    t = {"cynorm": 2e-3, "ort": 5e-3}
    f = measure.anchor_fields(t, ["ort", "ov"], {"ort": "LayerNormalization-17"})
    assert f["ort_s"] == 5e-3 and f["ort_over_cynorm"] == pytest.approx(2.5)
    assert f["ov_s"] is None and f["ov_over_cynorm"] is None
    assert f["ort_graph"] == "LayerNormalization-17"


def test_anchor_geomean_uses_its_own_ratio():
    rows = [dict(op="rms_norm", threads=2, torch_over_cynorm=1.0, jax_over_cynorm=r)
            for r in (0.5, 2.0, 8.0)]
    rows.append(dict(op="rms_norm", threads=2, torch_over_cynorm=1.0, jax_over_cynorm=None))
    for r in rows:
        r["pass"] = "fwd"
    s = report.anchor_summaries(rows, [2], ["jax", "ov"])
    assert set(s) == {"jax"}
    assert s["jax"][0][2] == pytest.approx(2.0)


def test_anchors_option():
    assert cli.parse_anchors("auto") is None and cli.parse_anchors(None) is None
    assert cli.parse_anchors("none") == []
    assert cli.parse_anchors("jax, ort") == ["jax", "ort"]
    with pytest.raises(ValueError, match="tensorflow"):
        cli.parse_anchors("ort,tensorflow")


def test_no_anchor_is_available_when_none_imports(monkeypatch):
    for mod in ("onnxruntime", "onnx", "openvino", "jax"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert anchors.available() == {}


def test_onnxruntime_column_needs_onnx_to_build_its_graphs(monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert "ort" not in anchors.available()


def test_fused_anchor_cells_are_ratios_to_the_fused_time():
    row = {"cn_fused_fwd": 1e-3, "cn_fused_fb": 4e-3, "ov_fwd": 3e-3, "jax_fwd": 2e-3,
           "jax_fb": 2e-3}
    cells = fused._anchor_cells(["ov", "jax"], row).split()
    assert cells[1:] == ["3.00", "2.00", "0.50"]
    assert "OpenVINO/cn" in fused.header(["ov", "jax"]) and "JAX/cn f+b" in fused.header(
        ["ov", "jax"])


def test_check_rejects_a_result_off_the_reference():
    """A graph with a wrong eps, a missing bias or the wrong axis is caught."""
    rng = np.random.default_rng(1)
    case = Case("layer_norm", (16, 64), None)
    x, dy, w, b = make_arrays(case, np.float32, rng)
    want = ref.layer_norm(x, 64, w, b)[0]
    anchors.check_close("good", want.astype(np.float32), want, np.float32)
    wrong = [ref.layer_norm(x, 64, w, b, eps=0.5)[0], ref.layer_norm(x, 64, w, None)[0],
             (ref.layer_norm(x.T.copy(), 16, None, None)[0].T * w + b)]
    for bad in wrong:
        with pytest.raises(anchors.AnchorUnavailable, match="differs"):
            anchors.check_close("bad", bad.astype(np.float32), want, np.float32)
    with pytest.raises(anchors.AnchorUnavailable, match="shape"):
        anchors.check_close("bad", want[:8], want, np.float32)


@pytest.mark.parametrize("case", TINY_SUITE, ids=lambda c: c.op)
def test_anchor_reference_matches_the_test_references(case):
    rng = np.random.default_rng(2)
    x, dy, w, b = make_arrays(case, np.float32, rng)
    y, grads = anchors.reference(case, x, w, b, dy)
    if case.op == "group_norm":
        want, m, r = ref.group_norm(x, case.groups, w, b)
        wgrads = ref.group_norm_backward(dy, x, m, r, case.groups, w)
    elif case.op == "instance_norm":
        want, m, r = ref.instance_norm(x, w, b)
        wgrads = ref.instance_norm_backward(dy, x, m, r, w)
    elif case.op == "batch_norm":
        want, m, r = ref.batch_norm(x, None, None, w, b, training=True)[:3]
        wgrads = ref.batch_norm_backward(dy, x, m, r, w)
    elif case.op == "layer_norm":
        want, m, r = ref.layer_norm(x, x.shape[-1], w, b)
        wgrads = ref.layer_norm_backward(dy, x, m, r, x.shape[-1], w)
    else:
        want, r = ref.rms_norm(x, x.shape[-1], w)
        wgrads = ref.rms_norm_backward(dy, x, r, x.shape[-1], w)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    for g, wg in zip(grads, wgrads):
        np.testing.assert_allclose(g, wg, rtol=1e-10, atol=1e-10)


# ---- each anchor against the float64 reference, where importable --------------------

ANCHOR_MODULES = {"ort": "onnxruntime", "ov": "openvino", "jax": "jax"}


def _need(key):
    pytest.importorskip(ANCHOR_MODULES[key])
    if key == "ort":
        pytest.importorskip("onnx")


@pytest.mark.parametrize("key", ["ort", "ov", "jax"])
@pytest.mark.parametrize("case", TINY_SUITE + [Case("group_norm", (2, 64, 6, 6), 32)],
                         ids=lambda c: getattr(c, "op", c))
def test_anchor_float32_result_matches_the_float64_reference(key, case):
    _need(key)
    rng = np.random.default_rng(3)
    x, dy, w, b = make_arrays(case, np.float32, rng)
    ca = anchors.CaseAnchors(case, x, dy, w, b, [key])
    threads = anchors.jax_threads() if key == "jax" else 1
    calls = ca.calls(threads)
    assert key in calls["fwd"], ca.notes
    got = calls["fwd"][key]()
    y = got[0] if isinstance(got, (list, tuple)) else got
    want = ref.__dict__[case.op]  # the independent reference, not the bench's own
    if case.op == "group_norm":
        want = want(x, case.groups, w, b)[0]
    elif case.op in ("instance_norm",):
        want = want(x, w, b)[0]
    elif case.op == "batch_norm":
        want = want(x, None, None, w, b, training=True)[0]
    elif case.op == "layer_norm":
        want = want(x, x.shape[-1], w, b)[0]
    else:
        want = want(x, x.shape[-1], w)[0]
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-4, atol=1e-4)
    if key == "jax":
        grads = calls["fwd+bwd"]["jax"]()
        assert len(grads) == (2 if case.op == "rms_norm" else 3)


@pytest.mark.parametrize("key", ["ort", "ov", "jax"])
def test_anchor_with_a_wrong_graph_is_left_out_with_a_note(key, monkeypatch):
    _need(key)
    monkeypatch.setattr(anchors, "_eps", lambda case, dtype: 0.5)  # a wrong graph
    case = Case("layer_norm", (8, 32), None)
    x, dy, w, b = make_arrays(case, np.float32, np.random.default_rng(4))
    ca = anchors.CaseAnchors(case, x, dy, w, b, [key])
    calls = ca.calls(anchors.jax_threads() if key == "jax" else 1)
    assert key not in calls["fwd"]
    assert any("differs from the float64 reference" in m for m in ca.notes), ca.notes


@pytest.mark.parametrize("block", ["gn_silu", "add_layer_norm", "add_rms_norm"])
def test_fused_anchor_results_match_the_float64_composite(block):
    keys = [k for k in ("ov", "jax") if __import__("importlib").util.find_spec(
        ANCHOR_MODULES[k])]
    if not keys:
        pytest.skip("neither openvino nor jax is installed")
    rng = np.random.default_rng(5)
    shape = (2, 64, 6, 6) if block == "gn_silu" else (8, 48)
    x = rng.standard_normal(shape, dtype=np.float32)
    r = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    C = shape[1] if block == "gn_silu" else shape[-1]
    w = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    b = None if block == "add_rms_norm" else (0.1 * rng.standard_normal(C)).astype(
        np.float32)
    calls, notes = anchors.fused_anchor_calls(block, anchors.jax_threads(), keys, x, w, b,
                                              r, dy, groups=32)
    assert not notes
    if block == "gn_silu":
        z = ref.group_norm(x, 32, w, b)[0]
        want = (z * (1 / (1 + np.exp(-z))),)
    elif block == "add_layer_norm":
        h = x.astype(np.float64) + r
        want = (ref.layer_norm(h, C, w, b)[0], h)
    else:
        h = x.astype(np.float64) + r
        want = (ref.rms_norm(h, C, w, eps=1e-6)[0], h)
    for k in keys:
        got = calls[f"{k}_fwd"]()
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(want)
        for g, wv in zip(got, want):
            np.testing.assert_allclose(np.asarray(g, np.float64), wv, rtol=1e-4, atol=1e-4)
    if "jax" in keys:
        assert "jax_fb" in calls


@pytest.mark.parametrize("option", ["none", "auto"])
def test_bench_json_carries_the_anchor_cells_it_was_asked_for(tmp_path, option):
    import importlib.util
    import json
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "b.json"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "cynorm", "bench", "--tiny", "--quick",
                           "--ops", "rms_norm", "--threads", "1", "--repeats", "1",
                           "--anchors", option, "--json", str(path)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(path.read_text())
    installed = {k for k, m in ANCHOR_MODULES.items() if importlib.util.find_spec(m)
                 and (k != "ort" or importlib.util.find_spec("onnx"))}
    expect = set() if option == "none" else installed
    assert {k for k, lab in anchors.LABELS.items()
            if lab in doc["meta"]["anchors"]} == expect
    for row in doc["results"]:
        for k in expect:
            assert f"{k}_s" in row and f"{k}_over_cynorm" in row
        for k in set(anchors.LABELS) - expect:
            assert f"{k}_s" not in row
        if "ort" in expect and row["pass"] == "fwd":
            assert row["ort_s"] > 0  # SimplifiedLayerNormalization ran and passed
        if "jax" in expect:  # --threads 1 sizes XLA's pool to one thread
            assert row["jax_s"] > 0
