"""Runtime instruction-set dispatch: the kernels of every level give bitwise the same
results, the level that runs is the one chosen and reported, CYNORM_ISA forces a level
(and never one the CPU lacks), and each level's modules hold only its instructions."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cynorm
import cynorm._kernels as kernels

ROOT = os.path.dirname(os.path.dirname(cynorm.__file__))
TESTS = os.path.dirname(os.path.abspath(__file__))
RUNNABLE = [lv for lv in kernels.BUILT_LEVELS if lv in kernels.CPU_LEVELS]

# Every determinism case (tests/test_determinism.py; GroupNorm's also channels-last),
# forward and backward, every storage dtype (float32, float64, float16, and bfloat16
# where ml_dtypes is installed), under one forced level; the arrays go to an .npz named
# by the case.
WORKER = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import cynorm, cynorm._kernels as k
import test_determinism as td

res = {}
def put(name, arrays):
    for i, a in enumerate(arrays if isinstance(arrays, tuple) else (arrays,)):
        # 16-bit results as their bits (an .npz cannot hold ml_dtypes' bfloat16)
        res[f"{name}/{i}"] = a.view(np.uint16) if a.dtype.itemsize == 2 else a

DTYPES = [np.float32, np.float64, np.float16]
try:
    import ml_dtypes
    DTYPES.append(ml_dtypes.bfloat16)
except ImportError:
    pass
for dt in DTYPES:
    d = lambda shape, seed=0, loc=0.3: td.data(shape, dt, seed, loc)
    t = np.dtype(dt).name
    for shape, G in td.GN_CASES:
        for stats in ("two_pass", "welford"):
            x, dy = d(shape), d(shape, 3)
            w, b = d(shape[1], 1, 1.0), d(shape[1], 2)
            y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, stats=stats)
            put(f"gn {shape} {G} {stats} {t}", (y, m, r))
            put(f"gn bwd {shape} {G} {stats} {t}",
                cynorm.group_norm_backward(dy, x, m, r, G, w))
        if len(shape) > 2:  # channels last (N, *spatial, C), with an activation
            x, dy = np.moveaxis(d(shape), 1, -1).copy(), np.moveaxis(d(shape, 3), 1, -1).copy()
            w, b = d(shape[1], 1, 1.0), d(shape[1], 2)
            y, m, r = cynorm.group_norm(x, G, w, b, return_stats=True, activation="silu",
                                        channel_axis=-1)
            put(f"gn last {shape} {G} {t}", (y, m, r))
            put(f"gn last bwd {shape} {G} {t}",
                cynorm.group_norm_backward(dy, x, m, r, G, w, bias=b, activation="silu",
                                           channel_axis=-1))
            # no activation (the register-tiled apply); channel 0's first positions far
            # from its other values (its group's statistics take two passes)
            put(f"gn last plain {shape} {G} {t}",
                cynorm.group_norm(x, G, w, b, return_stats=True, channel_axis=-1))
            xh = x.astype(np.float64).reshape(shape[0], -1, shape[1])
            xh[:, :16, 0] += 100.0
            put(f"gn last head {shape} {G} {t}",
                cynorm.group_norm(xh.reshape(x.shape).astype(dt), G, w, b,
                                  return_stats=True, channel_axis=-1))
    for shape in td.IN_SHAPES:
        x, dy = d(shape), d(shape, 3)
        w, b = d(shape[1], 1, 1.0), d(shape[1], 2)
        y, m, r = cynorm.instance_norm(x, w, b, return_stats=True)
        put(f"in {shape} {t}", (y, m, r))
        put(f"in bwd {shape} {t}", cynorm.instance_norm_backward(dy, x, m, r, w))
    for shape in td.BN_SHAPES:
        for training in (True, False):
            x, dy = d(shape), d(shape, 3)
            C = shape[1]
            w, b = d(C, 1, 1.0), d(C, 2)
            rm, rv = d(C, 4), np.abs(d(C, 5)) + 0.5
            y, m, r = cynorm.batch_norm(x, rm, rv, w, b, training=training,
                                        return_stats=True)
            put(f"bn {shape} {training} {t}", (y, m, r, rm, rv))
            put(f"bn bwd {shape} {training} {t}",
                cynorm.batch_norm_backward(dy, x, m, r, w, training=training))
    for shape, ns in td.LN_CASES:
        nst = (ns,) if isinstance(ns, int) else ns
        for stats in ("two_pass", "welford"):
            x, dy = d(shape), d(shape, 3)
            w, b = d(nst, 1, 1.0), d(nst, 2)
            y, m, r = cynorm.layer_norm(x, ns, w, b, return_stats=True, stats=stats)
            put(f"ln {shape} {stats} {t}", (y, m, r))
            put(f"ln bwd {shape} {stats} {t}", cynorm.layer_norm_backward(dy, x, m, r, ns, w))
    for shape, ns in td.RMS_CASES:
        nst = (ns,) if isinstance(ns, int) else ns
        x, dy = d(shape), d(shape, 3)
        w = d(nst, 1, 1.0)
        y, r = cynorm.rms_norm(x, ns, w, return_stats=True)
        put(f"rms {shape} {t}", (y, r))
        put(f"rms bwd {shape} {t}", cynorm.rms_norm_backward(dy, x, r, ns, w))
np.savez(sys.argv[1], **res)
print(json.dumps({"level": k.LEVEL, "reason": k.REASON, "info": k.runtime.build_info()}))
"""


def run_level(level, out, extra_env=None):
    env = dict(os.environ, CYNORM_ISA=level, OMP_NUM_THREADS="2")
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-c", WORKER, str(out), TESTS], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_every_level_gives_bitwise_identical_results(tmp_path):
    if len(RUNNABLE) < 2:
        pytest.skip(f"only {RUNNABLE} of the built levels {kernels.BUILT_LEVELS} "
                    "run on this CPU: nothing to compare")
    results = {}
    for level in RUNNABLE:
        report = run_level(level, tmp_path / f"{level}.npz")
        assert report["level"] == level == report["info"]["level"]
        assert report["reason"] == f"forced by CYNORM_ISA={level}"
        results[level] = np.load(tmp_path / f"{level}.npz")
    base = results[RUNNABLE[0]]
    assert len(base.files) > 100
    for level in RUNNABLE[1:]:
        other = results[level]
        assert sorted(other.files) == sorted(base.files)
        for name in base.files:
            a, b = base[name], other[name]
            assert a.dtype == b.dtype and a.shape == b.shape, name
            # bitwise: compare the raw bytes, so that -0.0 and NaN payloads count too
            assert a.tobytes() == b.tobytes(), (
                f"{name}: {level} differs from {RUNNABLE[0]}, max abs diff "
                f"{np.nanmax(np.abs(a.astype(float) - b.astype(float)))}")


def test_the_kernels_in_use_are_the_chosen_levels():
    for name in kernels.MODULE_NAMES:
        module = sys.modules[f"cynorm._kernels.{name}"]
        assert module is getattr(kernels, name)
        assert module.__name__ == f"cynorm._kernels._{kernels.LEVEL}.{name}"
    for name in ("slab", "channel", "row", "columns", "runtime", "channels_last"):
        assert name in kernels.MODULE_NAMES
    assert kernels.runtime.build_info()["level"] == kernels.LEVEL


def test_automatic_choice_is_the_best_level_the_cpu_runs():
    if "CYNORM_ISA" in os.environ or kernels.LEVEL == "single":
        pytest.skip("a forced level or a single-target build")
    assert kernels.LEVEL == RUNNABLE[-1]
    assert kernels.REASON == "the best level built that the CPU supports"


@pytest.mark.parametrize("flags, expect", [
    ({"X86_V2": True, "X86_V3": True, "X86_V4": False}, ["baseline", "v3"]),
    ({"X86_V2": True, "X86_V3": False, "X86_V4": True}, ["baseline"]),
    # NumPy before 2.4 has no X86_V* entries: the single features decide
    ({"SSE": True, "SSE2": True, "SSE3": True, "SSSE3": True, "SSE41": True, "SSE42": True,
      "POPCNT": True, "AVX": True, "AVX2": True, "F16C": True, "FMA3": True, "BMI": True,
      "BMI2": True, "LZCNT": True, "MOVBE": True, "AVX512F": True}, ["baseline", "v3"]),
    ({"AVX2": True}, ["baseline"]),
    ({}, ["baseline"]),
])
def test_cpu_levels_follow_numpy_feature_table(flags, expect):
    if "v3" not in kernels._NAMES:
        pytest.skip("x86-64 levels")
    assert kernels._supported(flags) == expect


def test_forcing_a_level_the_cpu_lacks_warns_and_falls_back(monkeypatch):
    if "v4" not in kernels.BUILT_LEVELS:
        pytest.skip("no v4 build here")
    monkeypatch.setattr(kernels, "_cpu_features",
                        lambda: {"X86_V2": True, "X86_V3": True, "X86_V4": False})
    monkeypatch.setenv("CYNORM_ISA", "v4")
    with pytest.warns(RuntimeWarning, match="CYNORM_ISA=v4 cannot be used .the CPU lacks"):
        level, reason = kernels._choose()
    assert level == "v3" and "CYNORM_ISA=v4" in reason


def test_forcing_an_unknown_level_raises_naming_the_variable():
    env = dict(os.environ, CYNORM_ISA="avx9000")
    proc = subprocess.run([sys.executable, "-c", "import cynorm"], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ImportError: CYNORM_ISA='avx9000' is not a level" in proc.stderr


def test_v2_names_the_baseline():
    if "baseline" not in RUNNABLE or "v3" not in kernels._NAMES:
        pytest.skip("x86-64 baseline build")
    env = dict(os.environ, CYNORM_ISA="v2")
    code = "import cynorm._kernels as k; print(k.LEVEL, k.runtime.build_info()['isa'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["baseline", "SSE4.2"]


def test_show_config_reports_the_level_and_why(capsys):
    cfg = cynorm.show_config("dicts")
    assert cfg["kernels"]["level"] == kernels.LEVEL
    assert cfg["kernels"]["reason"] == kernels.REASON
    assert cfg["kernels"]["path"].endswith(f"_{kernels.LEVEL}")
    assert cynorm.show_config() is None
    out = capsys.readouterr().out
    assert f"kernels: {kernels.LEVEL}, {kernels.REASON}" in out
    with pytest.raises(ValueError, match="mode"):
        cynorm.show_config("yaml")  # type: ignore[call-overload]


# Registers a level's modules must not touch: the baseline no ymm/zmm (AVX, AVX-512),
# v3 no zmm; and the API modules are baseline code.
FORBIDDEN = {"baseline": ("ymm", "zmm"), "v3": ("zmm",), "api": ("ymm", "zmm")}


@pytest.mark.skipif(not shutil.which("objdump"), reason="needs binutils' objdump")
@pytest.mark.parametrize("level", ["baseline", "v3", "v4", "api"])
def test_each_levels_modules_hold_only_its_instructions(level):
    if level != "api" and level not in kernels.BUILT_LEVELS:
        pytest.skip(f"no {level} build here")
    if "v3" not in kernels._NAMES:
        pytest.skip("x86-64 levels")
    if level == "api":
        files = [sys.modules[m].__file__ for m in ("cynorm._api", "cynorm._validate")]
        if not all(f.endswith(".so") for f in files):
            pytest.skip("the API modules run as plain Python here")
    else:
        d = os.path.join(os.path.dirname(kernels.__file__), "_" + level)
        files = [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".so")]
    assert files
    all_used = set()
    for f in files:
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f], check=True,
                             capture_output=True, text=True).stdout
        used = set(re.findall(r"%([xyz]mm)\d+", asm))
        assert not used & set(FORBIDDEN.get(level, ())), (f, used)
        all_used |= used
    if level == "v4":
        assert "zmm" in all_used, "the v4 build uses no AVX-512 registers"
