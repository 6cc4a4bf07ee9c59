"""`python -m cynorm bench --fused`: it runs, reports every block and writes its JSON.
No timing is asserted."""
import json
import math
import os
import importlib.util
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fused_bench_reports_every_block_and_writes_json(tmp_path):
    path = tmp_path / "fused.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "cynorm", "bench", "--fused", "--tiny",
                           "--threads", "1", "--repeats", "2", "--json", str(path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for block in ("gn_silu", "add_layer_norm", "add_rms_norm"):
        assert block in proc.stdout
    assert "geometric means" in proc.stdout
    with open(path) as f:
        data = json.load(f)
    rows = data["fused"]
    assert {(r["block"], r["out"]) for r in rows} == {
        (b, o) for b in ("gn_silu", "add_layer_norm", "add_rms_norm") for o in (False, True)}
    keys = ["cn_fused_fwd", "cn_alone_fwd", "cn_fused_fb", "cn_alone_fb"]
    if importlib.util.find_spec("torch") is not None:
        keys += ["torch_fwd", "torch_fb"]
    for r in rows:
        for key in keys:
            assert r[key] > 0 and math.isfinite(r[key]), (r["block"], key)
    assert len(data["summary"]) == 3
