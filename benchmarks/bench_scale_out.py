"""Beyond one process: SyncBatchNorm over torch.distributed and cynorm.dask out of core.

1. SyncBatchNorm: `--ranks` processes (default 2) x 1 thread, gloo on 127.0.0.1, each
   with its share of a global float32 batch (default (32, 64, 56, 56)), forward +
   backward of cynorm.torch.SyncBatchNorm; against one process running
   cynorm.torch.BatchNorm2d (and torch.nn.BatchNorm2d, for context) on the whole batch
   with `--ranks` threads. Median over `--repeats` steps; a distributed step's time is
   the slowest rank's. Target: sync / single <= 1.5.
2. cynorm.dask BatchNorm of a float32 array on disk (default 4 GB; np.memmap) by a
   LocalCluster of 2 workers x 1 thread, each with a memory limit of 1/8 of the array
   (the cluster: 1/4), read and written chunk by chunk (examples/dask_out_of_core.py);
   against cynorm.batch_norm on an in-memory float32 array (default 1/8 of the size) with
   2 threads, in GB/s of input. Target: dask / in memory >= 1/3, no worker above its
   limit. y is dropped by default (--output disk writes it to a second file, which
   then measures the disk's write speed as well).

    python benchmarks/bench_scale_out.py                 # the full run (a few minutes)
    python benchmarks/bench_scale_out.py --quick         # small sizes, a sanity check
    python benchmarks/bench_scale_out.py --json out.json

Run it on a quiet machine; it needs torch, dask and distributed.
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- 1. SyncBatchNorm ------------------------------------------------------------------

def _sync_worker(rank, world, port, shape, repeats, out_path):
    import torch
    import torch.distributed as dist
    from threadpoolctl import threadpool_limits

    import cynorm.torch as ct

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    local = (shape[0] // world,) + tuple(shape[1:])
    rng = np.random.default_rng(rank)
    x = torch.from_numpy(rng.standard_normal(local, dtype=np.float32)).requires_grad_()
    g = torch.from_numpy(rng.standard_normal(local, dtype=np.float32))
    layer = ct.SyncBatchNorm(shape[1])
    times = []
    with threadpool_limits(1, user_api="openmp"):
        for i in range(repeats + 2):
            dist.barrier()
            t0 = time.perf_counter()
            layer(x).backward(g)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i >= 2:  # warm-up steps
                times.append(float(dt))
            x.grad = None
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def bench_sync(shape, ranks, repeats, tmpdir):
    import torch
    import torch.multiprocessing as mp
    from threadpoolctl import threadpool_limits

    import cynorm.torch as ct

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = os.path.join(tmpdir, "sync_times.json")
    mp.spawn(_sync_worker, args=(ranks, port, shape, repeats, out_path), nprocs=ranks)
    with open(out_path) as f:
        sync = statistics.median(json.load(f))

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).requires_grad_()
    g = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    single = {}
    torch.set_num_threads(ranks)
    for name, layer in (("cynorm BatchNorm2d", ct.BatchNorm2d(shape[1])),
                        ("torch BatchNorm2d", torch.nn.BatchNorm2d(shape[1]))):
        times = []
        with threadpool_limits(ranks, user_api="openmp"):
            for i in range(repeats + 2):
                t0 = time.perf_counter()
                layer(x).backward(g)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
                x.grad = None
        single[name] = statistics.median(times)
    base = single["cynorm BatchNorm2d"]
    return {"global_shape": list(shape), "ranks": ranks,
            "sync_ms": sync * 1e3,
            "single_ms": {k: v * 1e3 for k, v in single.items()},
            "sync_over_single": sync / base}


# ---- 2. cynorm.dask out of core ----------------------------------------------------------

def bench_dask(gb, in_memory_gb, repeats, directory, min_limit_gb, output):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import dask_out_of_core as ex
    from threadpoolctl import threadpool_limits

    import cynorm

    nbytes = int(gb * 1e9)
    limit = max(nbytes // 8, int(min_limit_gb * 1e9))
    r = ex.run(gb, directory, workers=2, memory_limit=limit, ops="bn", verbose=False,
               output=output)

    n = max(2, int(in_memory_gb * 1e9 / (ex.C * ex.H * ex.W * 4)))
    x = np.random.default_rng(0).standard_normal((n, ex.C, ex.H, ex.W), dtype=np.float32)
    y = np.empty_like(x)
    times = []
    with threadpool_limits(2, user_api="openmp"):
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            cynorm.batch_norm(x, training=True, out=y)
            if i:
                times.append(time.perf_counter() - t0)
    mem = x.nbytes / statistics.median(times) / 1e9
    r.update({"in_memory_gb": x.nbytes / 1e9, "in_memory_gb_per_s": mem,
              "dask_over_in_memory": r["gb_per_s"] / mem})
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="global batch (8, 64, 56, 56), a 0.5 GB array: a sanity check")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dask-gb", type=float, default=None)
    p.add_argument("--dir", default=None, help="folder for the array files (default tmp)")
    p.add_argument("--output", choices=["disk", "discard"], default="discard",
                   help="y of the dask run: dropped (default: the normalisation and the "
                        "reads, not the disk's write speed) or written to a file")
    p.add_argument("--skip-sync", action="store_true")
    p.add_argument("--skip-dask", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    shape = (8, 64, 56, 56) if a.quick else (32, 64, 56, 56)
    repeats = a.repeats or (5 if a.quick else 15)
    gb = a.dask_gb or (0.5 if a.quick else 4.0)
    # a worker process needs a few hundred MB of its own: the quick run's limit is that
    min_limit = 0.4 if a.quick else 0.0
    results = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        if not a.skip_sync:
            s = bench_sync(shape, a.ranks, repeats, tmp)
            results["sync_batch_norm"] = s
            print(f"SyncBatchNorm fwd+bwd, global batch {tuple(shape)} float32: "
                  f"{a.ranks} processes x 1 thread {s['sync_ms']:.1f} ms; one process, "
                  f"{a.ranks} threads: "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in s["single_ms"].items())
                  + f"; sync / single cynorm = {s['sync_over_single']:.2f} "
                  "(target <= 1.5)")
        if not a.skip_dask:
            d = bench_dask(gb, gb / 8, 3, a.dir, min_limit, a.output)
            results["dask_batch_norm"] = d
            print(f"cynorm.dask BatchNorm, {d['array_gb']:.2f} GB float32 on disk, 2 "
                  f"workers x 1 thread, memory limit {d['worker_memory_limit_gb']:.2f} GB "
                  f"each, y {d['output']}: {d['gb_per_s']:.3f} GB/s, peak worker memory "
                  + ", ".join(f"{v:.2f}" for v in d["peak_worker_memory_gb"])
                  + f" GB ({'within' if d['within_memory_limit'] else 'ABOVE'} the "
                  f"limit); in memory ({d['in_memory_gb']:.2f} GB, 2 threads): "
                  f"{d['in_memory_gb_per_s']:.3f} GB/s; dask / in memory = "
                  f"{d['dask_over_in_memory']:.2f} (target >= 0.33)")
    results["load_average_after"] = os.getloadavg()
    print(f"load average before {results['load_average'][0]:.1f}, after "
          f"{results['load_average_after'][0]:.1f} ({results['cpus']} CPUs)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
