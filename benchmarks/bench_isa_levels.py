"""Time cynorm's kernels at each instruction-set level, side by side, and optionally
against another build of cynorm (e.g. a single -march=native build in another tree).

    python benchmarks/bench_isa_levels.py                       # this tree's levels
    python benchmarks/bench_isa_levels.py --against ../other    # plus that tree's build

Each configuration (a tree on PYTHONPATH and a CYNORM_ISA value) runs in its own
process; the rounds interleave the configurations so that a change in the machine's load
falls on all of them alike. Reported: the median over rounds of each case's best time
(float32, forward and backward of GroupNorm, LayerNorm and RMSNorm), and each
configuration's time relative to the first one. Takes about a minute.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys, time
import numpy as np
import cynorm, cynorm._kernels as k, cynorm._kernels.runtime as rt

def best(fn, reps):
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); t.append(time.perf_counter() - t0)
    return min(t)

rng = np.random.default_rng(0)
# a build without runtime dispatch has no level and no build_info
info = rt.build_info() if hasattr(rt, "build_info") else {"flags": "its own build flags"}
out = {"level": getattr(k, "LEVEL", "one build"), "info": info, "times": {}}
for label, shape in (("16 MiB", (4096, 1024)), ("1 MiB", (256, 1024))):
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = np.ones(1024, np.float32); b = np.zeros(1024, np.float32)
    reps = 10 if label == "16 MiB" else 100
    img = x.reshape(shape[0] // 64, 64, 1024)
    dimg = dy.reshape(img.shape)
    w64 = np.ones(64, np.float32); b64 = np.zeros(64, np.float32)
    _, m, r = cynorm.group_norm(img, 16, w64, b64, return_stats=True)
    out["times"][f"group_norm forward {label}"] = best(lambda: cynorm.group_norm(img, 16, w64, b64), reps)
    out["times"][f"group_norm backward {label}"] = best(
        lambda: cynorm.group_norm_backward(dimg, img, m, r, 16, w64), reps)
    _, m, r = cynorm.layer_norm(x, 1024, w, b, return_stats=True)
    out["times"][f"layer_norm forward {label}"] = best(lambda: cynorm.layer_norm(x, 1024, w, b), reps)
    out["times"][f"layer_norm backward {label}"] = best(
        lambda: cynorm.layer_norm_backward(dy, x, m, r, 1024, w), reps)
    _, r = cynorm.rms_norm(x, 1024, w, return_stats=True)
    out["times"][f"rms_norm forward {label}"] = best(lambda: cynorm.rms_norm(x, 1024, w), reps)
    out["times"][f"rms_norm backward {label}"] = best(
        lambda: cynorm.rms_norm_backward(dy, x, r, 1024, w), reps)
print(json.dumps(out))
"""


def run(tree, isa, threads):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(threads))
    env.pop("CYNORM_ISA", None)
    if isa:
        env["CYNORM_ISA"] = isa
    res = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True,
                         text=True, check=True, cwd=tree)
    return json.loads(res.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", metavar="TREE", action="append", default=[],
                   help="another cynorm source tree, built in place, to time as well")
    p.add_argument("--levels", default="auto,v3,baseline",
                   help="CYNORM_ISA values for this tree (auto: unset); default %(default)s")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS for every configuration (default %(default)s: the "
                   "instruction sets compared, less exposed to other load)")
    args = p.parse_args()
    configs = [(HERE, "" if lv == "auto" else lv) for lv in args.levels.split(",")]
    configs += [(os.path.abspath(t), "") for t in args.against]
    times = {c: [] for c in configs}
    meta = {}
    for _ in range(args.rounds):
        for c in configs:
            r = run(*c, args.threads)
            meta[c] = r
            times[c].append(r["times"])
    names = []
    for c in configs:
        tree = "this tree" if c[0] == HERE else c[0]
        names.append(f"{tree}: {meta[c]['level']} ({meta[c]['info']['flags'] or 'default'})")
    try:
        load = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        load = "?"
    print(f"load average at the end: {load}; {args.rounds} rounds, median of best times, "
          f"{args.threads} thread(s)")
    for k, n in enumerate(names):
        print(f"  [{k}] {n}")
    cases = list(times[configs[0]][0])
    print(f"\n{'case':34}" + "".join(f"{'[%d] us' % k:>10}" for k in range(len(configs)))
          + "".join(f"{'[%d]/[0]' % k:>9}" for k in range(1, len(configs))))
    for case in cases:
        med = [statistics.median(t[case] for t in times[c]) * 1e6 for c in configs]
        print(f"{case:34}" + "".join(f"{m:10.1f}" for m in med)
              + "".join(f"{m / med[0]:9.2f}" for m in med[1:]))


if __name__ == "__main__":
    main()
