"""Time cynorm's kernels at each instruction-set level, side by side, and optionally
against another build of cynorm (e.g. a single -march=native build in another tree).

    python benchmarks/bench_isa_levels.py                       # this tree's levels
    python benchmarks/bench_isa_levels.py --against ../other    # plus that tree's build
    python benchmarks/bench_isa_levels.py --against ../old@v3   # that tree's v3 kernels

Each configuration (a tree on PYTHONPATH and a CYNORM_ISA value) runs in its own
process; the rounds interleave the configurations so that a change in the machine's load
falls on all of them alike. Reported: the median over rounds of each case's best time
(float32, forward and backward of GroupNorm, LayerNorm and RMSNorm), and each
configuration's time relative to the first one. Takes about a minute.

Every array, inputs and outputs (passed as out=), starts at the same offset from a page
boundary (--offset, default 0) in every configuration. Left to the allocator, the
arrays' alignment depends on each process's heap history; for data in cache a 64-byte
vector load or store that straddles two cache lines costs up to 20% of a kernel's time,
enough to make two builds of the same code look 10-15% apart. --offset numpy leaves the
allocation to NumPy (and cynorm) as a user's call does. With one thread the time is the
process's CPU time (time.process_time), less exposed to other load than wall time.
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

OFFSET = None if sys.argv[1] == "numpy" else int(sys.argv[1])
clock = time.process_time if sys.argv[2] == "cpu" else time.perf_counter

def best(fn, reps):
    fn()
    t = []
    for _ in range(reps):
        t0 = clock(); fn(); t.append(clock() - t0)
    return min(t)

def place(a):  # a copied to OFFSET bytes past a page boundary (a itself for numpy)
    if OFFSET is None:
        return a
    buf = np.empty(a.nbytes + 2 * 4096, np.uint8)
    start = (-buf.ctypes.data) % 4096 + OFFSET
    b = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    b[...] = a
    return b

def out(a):  # an output like a at the fixed offset, or None (cynorm allocates it)
    return None if OFFSET is None else place(np.zeros_like(a))

rng = np.random.default_rng(0)
# a build without runtime dispatch has no level and no build_info
info = rt.build_info() if hasattr(rt, "build_info") else {"flags": "its own build flags"}
res = {"level": getattr(k, "LEVEL", "one build"), "info": info, "times": {}}
for label, shape in (("16 MiB", (4096, 1024)), ("1 MiB", (256, 1024))):
    x = place(rng.standard_normal(shape).astype(np.float32))
    dy = place(rng.standard_normal(shape).astype(np.float32))
    w = place(np.ones(1024, np.float32)); b = place(np.zeros(1024, np.float32))
    y, dx = out(x), out(x)
    reps = 10 if label == "16 MiB" else 100
    img = x.reshape(shape[0] // 64, 64, 1024)
    dimg = dy.reshape(img.shape)
    yimg = None if y is None else y.reshape(img.shape)
    dximg = None if dx is None else dx.reshape(img.shape)
    w64 = place(np.ones(64, np.float32)); b64 = place(np.zeros(64, np.float32))
    t = res["times"]
    _, m, r = cynorm.group_norm(img, 16, w64, b64, return_stats=True)
    t[f"group_norm forward {label}"] = best(
        lambda: cynorm.group_norm(img, 16, w64, b64, out=yimg), reps)
    t[f"group_norm backward {label}"] = best(
        lambda: cynorm.group_norm_backward(dimg, img, m, r, 16, w64, out=dximg), reps)
    _, m, r = cynorm.layer_norm(x, 1024, w, b, return_stats=True)
    t[f"layer_norm forward {label}"] = best(
        lambda: cynorm.layer_norm(x, 1024, w, b, out=y), reps)
    t[f"layer_norm backward {label}"] = best(
        lambda: cynorm.layer_norm_backward(dy, x, m, r, 1024, w, out=dx), reps)
    _, r = cynorm.rms_norm(x, 1024, w, return_stats=True)
    t[f"rms_norm forward {label}"] = best(lambda: cynorm.rms_norm(x, 1024, w, out=y), reps)
    t[f"rms_norm backward {label}"] = best(
        lambda: cynorm.rms_norm_backward(dy, x, r, 1024, w, out=dx), reps)
print(json.dumps(res))
"""


def run(tree, isa, threads, offset, clock):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(threads))
    env.pop("CYNORM_ISA", None)
    if isa:
        env["CYNORM_ISA"] = isa
    res = subprocess.run([sys.executable, "-c", WORKER, offset, clock], env=env,
                         capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(res.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", metavar="TREE", action="append", default=[],
                   help="another cynorm source tree, built in place, to time as well; "
                   "TREE@LEVEL forces CYNORM_ISA=LEVEL there")
    p.add_argument("--levels", default="auto,v3,baseline",
                   help="CYNORM_ISA values for this tree (auto: unset); default %(default)s")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS for every configuration (default %(default)s: the "
                   "instruction sets compared, less exposed to other load)")
    p.add_argument("--offset", default="0",
                   help="bytes past a page boundary at which every array starts, the same "
                   "in every configuration; 'numpy': NumPy's and cynorm's own allocation, "
                   "no out= (default %(default)s)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="cpu: process time; wall: elapsed time; auto (default): cpu with "
                   "one thread, wall with more")
    args = p.parse_args()
    if args.offset != "numpy" and not 0 <= int(args.offset) < 4096:
        p.error("--offset must be in [0, 4096) or 'numpy'")
    clock = args.clock if args.clock != "auto" else ("cpu" if args.threads == 1 else "wall")
    configs = [(HERE, "" if lv == "auto" else lv) for lv in args.levels.split(",")]
    for t in args.against:  # TREE or TREE@LEVEL
        tree, _, level = t.rpartition("@") if "@" in t else (t, "", "")
        configs.append((os.path.abspath(tree), "" if level == "auto" else level))
    times = {c: [] for c in configs}
    meta = {}
    for _ in range(args.rounds):
        for c in configs:
            r = run(*c, args.threads, args.offset, clock)
            meta[c] = r
            times[c].append(r["times"])
    names = []
    for c in configs:
        tree = "this tree" if c[0] == HERE else c[0] + (f"@{c[1]}" if c[1] else "")
        names.append(f"{tree}: {meta[c]['level']} ({meta[c]['info']['flags'] or 'default'})")
    try:
        load = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        load = "?"
    where = ("as NumPy allocates them" if args.offset == "numpy"
             else f"at {args.offset} bytes past a page boundary")
    print(f"load average at the end: {load}; {args.rounds} rounds, median of best "
          f"{'CPU' if clock == 'cpu' else 'wall'} times, {args.threads} thread(s), "
          f"arrays {where}")
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
