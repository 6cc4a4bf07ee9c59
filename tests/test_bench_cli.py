"""`python -m cynorm` (self-check) and `python -m cynorm bench` (benchmark): they run,
report, and write the JSON they promise. No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest

import cynorm
from cynorm.__main__ import main as cynorm_main
from cynorm.bench import cli, machine, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TORCH = "import sys; sys.modules['torch'] = None; "  # makes `import torch` fail


def run_cynorm(*args, block_torch=False):
    """`python -m cynorm ARGS` in a subprocess, with this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if block_torch:
        cmd = [sys.executable, "-c", NO_TORCH + "import runpy; sys.argv = ['cynorm'] + "
               f"{list(args)!r}; runpy.run_module('cynorm', run_name='__main__')"]
    else:
        cmd = [sys.executable, "-m", "cynorm", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def tiny_bench(tmp_path, *extra, block_torch=False):
    path = tmp_path / "bench.json"
    proc = run_cynorm("bench", "--tiny", "--quick", "--ops", "group_norm", "--threads", "1",
                      "--repeats", "2", "--json", str(path), *extra,
                      block_torch=block_torch)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(path) as f:
        return proc, json.load(f)


@pytest.mark.parametrize("block_torch", [False, True])
def test_self_check_passes(block_torch):
    proc = run_cynorm(block_torch=block_torch)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    assert "FAIL" not in proc.stdout
    assert cynorm.__version__ in proc.stdout
    assert "OpenMP" in proc.stdout


def test_bench_tiny_json(tmp_path):
    proc, doc = tiny_bench(tmp_path)
    assert {"meta", "copy_bandwidth_gbps", "results", "tiny_call", "skipped"} <= doc.keys()
    assert doc["meta"]["threads"] == [1]
    assert doc["meta"]["dtypes"] == ["float32"]
    assert doc["copy_bandwidth_gbps"]["1"] > 0
    rows = doc["results"]
    assert rows and {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    torch_present = doc["meta"]["torch"] is not None
    for r in rows:
        assert r["op"] == "group_norm" and r["threads"] == 1 and r["dtype"] == "float32"
        for key in ("cynorm_s", "cynorm_out_s", "numpy_s", "gbps", "pct_copy", "bytes"):
            assert r[key] > 0, key
        if torch_present:
            assert r["torch_s"] > 0 and r["torch_over_cynorm"] > 0
    # the table made it to stdout, with its columns
    for head in ("cynorm ms", "torch ms", "numpy ms", "torch/cy", "GB/s", "% copy"):
        assert head in proc.stdout


def test_bench_without_torch(tmp_path):
    proc, doc = tiny_bench(tmp_path, block_torch=True)
    assert doc["meta"]["torch"] is None
    assert all(r["torch_s"] is None and r["cynorm_s"] > 0 for r in doc["results"])
    assert "torch is not importable" in proc.stdout


def test_bench_plot_draws_both_libraries_as_the_json_reports(tmp_path):
    """The chart's bars are cynorm's and torch's GB/s of every row of the JSON results
    (bytes / median time), in order, and its lines the copy bandwidths; unstable rows
    draw no bars. The series are read back from what was drawn (stored in the PNG)."""
    pytest.importorskip("matplotlib")  # the `plot` extra; CI installs it
    from PIL import Image

    from cynorm.bench.plot import read_plot_series
    png = tmp_path / "bench.png"
    proc, doc = tiny_bench(tmp_path, "--plot", str(png), "--ops", "group_norm,layer_norm",
                           "--threads", "1,2")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 800 and im.height > 200
    series = read_plot_series(png)
    assert set(series) == {"fwd", "fwd+bwd"}
    torch_present = doc["meta"]["torch"] is not None
    for pass_, drawn in series.items():
        rows = [r for r in doc["results"] if r["pass"] == pass_]
        assert len(rows) == len(drawn["labels"]) == 4  # 2 ops x 2 thread counts
        for r, label, cy, th in zip(rows, drawn["labels"], drawn["cynorm_gbps"],
                                    drawn["torch_gbps"]):
            assert label.startswith(r["op"]) and label.endswith(f" {r['threads']}t")
            if r["unstable"]:
                assert cy == th == 0
                continue
            assert cy == pytest.approx(r["bytes"] / r["cynorm_s"] / 1e9, rel=1e-9)
            assert cy == pytest.approx(r["gbps"], rel=1e-9)
            if torch_present:
                assert th == pytest.approx(r["bytes"] / r["torch_s"] / 1e9, rel=1e-9)
            else:
                assert th == 0
        assert drawn["copy_gbps"] == pytest.approx(doc["copy_bandwidth_gbps"])


def test_bench_plot_without_matplotlib_fails_at_once_with_the_hint(tmp_path):
    blocked = "import sys; sys.modules['matplotlib'] = None; "
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = (blocked + "import runpy; sys.argv = ['cynorm', 'bench', '--tiny', '--plot', "
            f"{str(tmp_path / 'b.png')!r}]; runpy.run_module('cynorm', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "pip install cynorm[plot]" in proc.stderr
    assert "copy bandwidth" not in proc.stdout  # nothing was measured
    assert not (tmp_path / "b.png").exists()


def test_rows_with_unstable_timings_are_flagged_and_left_out():
    from cynorm.bench.measure import _instability
    one = {"threads": 1, "cynorm_s": 1e-3, "torch_s": 2e-3}
    calm = {"threads": 2, "cynorm_s": 0.6e-3, "torch_s": 1.5e-3}
    assert _instability({"cynorm": 1.1, "torch": 1.3}, one, None) is None
    assert _instability({"cynorm": 1.1, "torch": 1.3}, calm, one) is None
    assert "cynorm rounds 2.5x apart" in _instability({"cynorm": 2.5, "torch": 1.0}, one,
                                                      None)
    busy = dict(calm, torch_s=0.2)  # 100x slower on 2 threads than on 1
    assert "torch 2 threads 100x slower than 1" in _instability({}, busy, one)
    rows = [dict(op="layer_norm", threads=1, torch_over_cynorm=2.0, unstable=None),
            dict(op="layer_norm", threads=1, torch_over_cynorm=0.01, unstable="unstable: x")]
    for r in rows:
        r["pass"] = "fwd"
    assert report.geomean_summary(rows, [1])[0][1] == pytest.approx(2.0)
    ratio = dict((h, key) for h, key, _ in report.MAIN_COLUMNS)["torch/cy"]
    assert ratio(rows[0]) == 2.0 and ratio(rows[1]) is None


def test_progress_bar_uses_tqdm_when_installed(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    p = report.Progress(3)
    assert isinstance(p.bar, tqdm.tqdm)
    for k in range(3):
        p.step(f"case {k}")
    p.close()
    assert p.bar.n == 3 and "case 2" in term.getvalue()


def test_bench_rejects_unknown_op():
    proc = run_cynorm("bench", "--tiny", "--ops", "no_such_norm")
    assert proc.returncode != 0
    assert "no_such_norm" in proc.stderr


def test_bench_skips_an_op_missing_from_the_build(tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(cynorm, "group_norm_backward")
    path = tmp_path / "b.json"
    rc = cynorm_main(["bench", "--tiny", "--ops", "group_norm,instance_norm",
                      "--threads", "1", "--repeats", "1", "--json", str(path)])
    assert rc == 0
    doc = json.loads(path.read_text())
    assert {r["op"] for r in doc["results"]} == {"instance_norm"}
    assert any(s.startswith("group_norm:") for s in doc["skipped"])
    assert "group_norm: skipped" in capsys.readouterr().out


def test_table_printer_and_geomean(capsys):
    rows = [{"op": "layer_norm", "pass": "fwd", "threads": 1, "torch_over_cynorm": 2.0},
            {"op": "layer_norm", "pass": "fwd", "threads": 1, "torch_over_cynorm": 8.0},
            {"op": "layer_norm", "pass": "fwd", "threads": 2, "torch_over_cynorm": None}]
    summary = report.geomean_summary(rows, [1, 2])
    assert summary == [{"op": "layer_norm", "pass": "fwd", 1: pytest.approx(4.0), 2: None}]
    report.print_table(summary, [("op", "op", ""), ("1 thr", 1, ".2f"),
                                 ("2 thr", 2, ".2f")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["op", "1", "thr", "2", "thr"]
    assert out[2].split() == ["layer_norm", "4.00", "-"]


def test_parse_threads():
    assert cli.parse_threads("1,1,2") == [1, 2]
    assert cli.parse_threads("all") == [machine.all_threads()]
    with pytest.raises(ValueError):
        cli.parse_threads("0")


def test_bench_torch_module_section(tmp_path):
    """`--torch-modules`: each cynorm.torch module against its torch.nn twin (suite shapes,
    tiny calls with minimum and p90, the mixed model), inference and training, in the
    table and the JSON."""
    pytest.importorskip("torch")
    path = tmp_path / "tm.json"
    proc = run_cynorm("bench", "--torch-modules", "--tiny", "--quick", "--threads", "1",
                      "--repeats", "1", "--json", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(path.read_text())["torch_modules"]
    suite = doc["suite"]
    assert {r["op"] for r in suite} == {"group_norm", "instance_norm", "batch_norm",
                                        "layer_norm", "rms_norm"}
    assert {r["mode"] for r in suite} == {"inference", "training"}
    for r in suite:
        assert r["torch_s"] > 0 and r["cynorm_torch_s"] > 0
        assert (r["numpy_api_s"] is not None) == (r["mode"] == "inference")
    assert {r["module"] for r in doc["tiny"]} == {"GroupNorm(32)", "LayerNorm(768)",
                                                  "BatchNorm1d(64)"}
    for r in doc["tiny"]:
        assert 0 < r["torch_min_s"] <= r["torch_p90_s"]
        assert 0 < r["cynorm_torch_min_s"] <= r["cynorm_torch_p90_s"]
        if r["mode"] == "inference":
            assert r["overhead_over_numpy_api_s"] == pytest.approx(
                r["cynorm_torch_min_s"] - r["numpy_api_min_s"])
    assert {r["mode"] for r in doc["mixed"]} == {"inference", "training"}
    assert all(r["torch_s"] > 0 and r["cynorm_torch_s"] > 0 for r in doc["mixed"])
    for head in ("torch/cy.torch", "torch p90", "cy.torch min", "overhead", "mixed model"):
        assert head in proc.stdout


def test_bench_torch_module_section_needs_torch():
    proc = run_cynorm("bench", "--torch-modules", "--tiny", block_torch=True)
    assert proc.returncode != 0
    assert "needs PyTorch" in proc.stderr
