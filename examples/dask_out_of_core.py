"""Normalise an array larger than the memory of the cluster that processes it.

A float32 array (N, C, H, W) lives on disk (np.memmap). A distributed.LocalCluster of 2
worker processes, each with a memory limit far below the array's size, computes

    y = GroupNorm(8 groups)(BatchNorm(x))        (BatchNorm with batch statistics)

with cynorm.dask and writes y to a second file on disk, chunk by chunk. BatchNorm's sets
span the whole array: its statistics pass reads every chunk once, and with reread=True
the apply reads them again rather than holding them in memory. GroupNorm's sets lie
inside a chunk (the array is chunked along N, 8 samples = 16 MiB a chunk), so it
streams. The script reports the throughput (input GB per second) and the peak memory
of each worker.

    python examples/dask_out_of_core.py                      # a 4 GB array
    python examples/dask_out_of_core.py --gb 1 --check       # smaller; verify a sample
    python examples/dask_out_of_core.py --gb 8 --dir /data   # files under /data

Needs dask and distributed: pip install 'cynorm[dask]'.
"""
import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np

C, H, W = 32, 128, 128       # one sample: 2 MiB of float32
GROUPS = 8


class DiskArray:
    """A raw float32 file on disk as an array-like that tasks can carry: each read (or
    write) of a region opens the file, so a task pickles a path, not the data. Reads
    go through np.memmap; a write of whole samples (rows along the first axis) is one
    write() of the file (no page faults on a mapping), any other through np.memmap."""

    def __init__(self, path, shape, dtype=np.float32):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def _rows(self, key):
        """(first row, rows) when key selects whole rows, else None."""
        key = key if isinstance(key, tuple) else (key,)
        if not key or not isinstance(key[0], slice) or any(
                k != slice(None) and k != slice(0, n, None) and k != slice(0, n, 1)
                for k, n in zip(key[1:], self.shape[1:])):
            return None
        start, stop, step = key[0].indices(self.shape[0])
        return (start, stop - start) if step == 1 and stop >= start else None

    def _row_bytes(self):
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def __getitem__(self, key):
        # a copy out of a mapping: fewer system calls than a read of the region
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)
        return np.array(mm[key])

    def __setitem__(self, key, value):
        rows = self._rows(key)
        if rows is None:
            np.memmap(self.path, dtype=self.dtype, mode="r+", shape=self.shape)[key] = value
            return
        value = np.ascontiguousarray(value, dtype=self.dtype)
        with open(self.path, "r+b", buffering=0) as f:
            f.seek(rows[0] * self._row_bytes())
            f.write(memoryview(value).cast("B"))


class Discard:
    """A store target that drops what it is given: the throughput of the normalisation
    and the reads alone, without the disk's write speed."""

    def __setitem__(self, key, value):
        pass


def make_input(path, n, seed=0, block=64):
    """An (n, C, H, W) float32 file of shifted, scaled normal data, written in blocks of
    `block` samples (never the whole array in memory)."""
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, C, H, W))
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 3.0, (1, C, 1, 1)).astype(np.float32)
    shift = rng.uniform(-2.0, 2.0, (1, C, 1, 1)).astype(np.float32)
    for i in range(0, n, block):
        m = min(block, n - i)
        mm[i:i + m] = rng.standard_normal((m, C, H, W), dtype=np.float32) * scale + shift
    mm.flush()
    del mm
    return DiskArray(path, (n, C, H, W))


def _warm_up():
    import dask.array as da

    import cynorm.dask
    x = da.ones((2, 2, 2), dtype=np.float32, chunks=1)
    cynorm.dask.batch_norm(x, training=True).compute(scheduler="synchronous")


def _peak_rss(dask_worker):
    """The largest resident memory the worker's own system monitor sampled (every
    0.5 s, distributed.admin.system-monitor.interval)."""
    return max(dask_worker.monitor.quantities["memory"])


def run(gb=4.0, directory=None, workers=2, memory_limit=None, chunk_samples=8,
        ops="bn+gn", check=False, verbose=True, output="disk"):
    """Build the input file (gb GB), normalise it on a LocalCluster, and return a dict
    of figures: array and limit sizes, seconds, GB/s, peak worker memory, and (check)
    the largest difference from cynorm in memory. output="discard": y is computed
    chunk by chunk and dropped instead of written (no check then)."""
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    import cynorm.dask as cd

    here = os.path.dirname(os.path.abspath(__file__))
    if __name__ != "__main__" and here not in sys.path:
        # imported as a module: the worker processes (which start with this process's
        # sys.path) unpickle DiskArray by importing this file by its name
        sys.path.append(here)

    n = max(2, int(gb * 1e9 / (C * H * W * 4)))
    nbytes = n * C * H * W * 4
    if memory_limit is None:  # the whole cluster holds a quarter of the array
        memory_limit = nbytes // (4 * workers)
    tmp = tempfile.TemporaryDirectory(dir=directory)
    try:
        t0 = time.perf_counter()
        src = make_input(os.path.join(tmp.name, "x.f32"), n)
        if output == "discard":
            dst, check = Discard(), False
        else:
            dst = DiskArray(os.path.join(tmp.name, "y.f32"), src.shape)
            np.memmap(dst.path, dtype=np.float32, mode="w+", shape=dst.shape).flush()
        t_make = time.perf_counter() - t0

        # one cynorm thread per worker process: the workers are the parallelism
        os.environ["OMP_NUM_THREADS"] = "1"
        # The graph streams (a chunk is read, normalised, written and dropped), so there
        # is nothing worth spilling to disk: spilling off, the pause (80%) and restart
        # (95% of the limit) thresholds stay as they are.
        no_spill = {"distributed.worker.memory.target": False,
                    "distributed.worker.memory.spill": False}
        with dask.config.set(no_spill), \
                LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                             memory_limit=int(memory_limit), host="127.0.0.1",
                             dashboard_address=None,
                             silence_logs=logging.CRITICAL) as cluster, \
                Client(cluster) as client:
            client.run(_warm_up)  # imports and thread pools, outside the timing
            x = da.from_array(src, chunks=(chunk_samples, C, H, W), name="x-on-disk",
                              lock=False, meta=np.empty((0, 0, 0, 0), np.float32))
            y = cd.batch_norm(x, training=True, reread=True)
            if ops == "bn+gn":
                y = cd.group_norm(y, GROUPS)
            t0 = time.perf_counter()
            da.store(y, dst, lock=False)
            seconds = time.perf_counter() - t0
            peaks = client.run(_peak_rss)
        result = {
            "array_gb": nbytes / 1e9, "workers": workers,
            "worker_memory_limit_gb": memory_limit / 1e9, "chunk_mb":
            chunk_samples * C * H * W * 4 / 1e6, "ops": ops, "output": output,
            "seconds": seconds,
            "gb_per_s": nbytes / seconds / 1e9, "make_input_seconds": t_make,
            "peak_worker_memory_gb": [v / 1e9 for v in peaks.values()],
        }
        # memory_limit=0: no limit (distributed's convention)
        result["within_memory_limit"] = (None if not memory_limit else
                                         all(v <= memory_limit for v in peaks.values()))
        if check:
            result["max_abs_diff"] = _check(src, dst, ops)
        if verbose:
            _report(result)
        return result
    finally:
        tmp.cleanup()


def _check(src, dst, ops):
    """The largest difference between y and cynorm in memory (small arrays only)."""
    import cynorm
    x = src[:]
    ref = cynorm.batch_norm(x, training=True)
    if ops == "bn+gn":
        ref = cynorm.group_norm(ref, GROUPS)
    return float(np.max(np.abs(dst[:].astype(np.float64) - ref)))


def _report(r):
    print(f"array {r['array_gb']:.2f} GB float32 on disk; {r['workers']} workers, "
          f"memory limit {r['worker_memory_limit_gb']:.2f} GB each, chunks of "
          f"{r['chunk_mb']:.0f} MB")
    print(f"{r['ops']} (y: {r['output']}): {r['seconds']:.1f} s, {r['gb_per_s']:.2f} GB/s "
          "of input")
    print("peak worker memory: " + ", ".join(f"{v:.2f} GB"
                                             for v in r["peak_worker_memory_gb"])
          + ("  (above the limit!)" if r["within_memory_limit"] is False else ""))
    if "max_abs_diff" in r:
        print(f"largest difference from cynorm in memory: {r['max_abs_diff']:.3g}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=4.0, help="array size in GB (default 4)")
    p.add_argument("--dir", default=None, help="folder for the two files (default: tmp)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="per worker (default: a quarter of the array over all workers)")
    p.add_argument("--ops", choices=["bn", "bn+gn"], default="bn+gn")
    p.add_argument("--output", choices=["disk", "discard"], default="disk",
                   help="write y to a second file (default), or drop it")
    p.add_argument("--check", action="store_true",
                   help="compare y with cynorm in memory (reads the whole array)")
    a = p.parse_args()
    run(a.gb, a.dir, a.workers,
        None if a.memory_limit_gb is None else a.memory_limit_gb * 1e9,
        ops=a.ops, check=a.check, output=a.output)


if __name__ == "__main__":
    main()
