"""`python -m cynorm bench`: options, configuration and the run that ties the suite, the
measurement loop and the report together."""
import argparse
import math
import platform
import time
from collections import namedtuple

import numpy as np

from cynorm.bench import anchors as anchor_mod
from cynorm.bench.impls import Missing, cynorm_op
from cynorm.bench.machine import (
    _cpu_name,
    all_threads,
    available_memory,
    copy_array_bytes,
    copy_bandwidth,
    llc_bytes,
)
from cynorm.bench.measure import bandwidth_cases, bench_bandwidth, bench_case
from cynorm.bench.plot import have_matplotlib, write_plot
from cynorm.bench.report import (
    BANDWIDTH_COLUMNS,
    Progress,
    _write_json,
    anchor_summaries,
    geomean_summary,
    print_report,
    print_table,
)
from cynorm.bench.suite import (
    FULL_SUITE,
    OPS,
    PASSES,
    QUICK_SUITE,
    TINY_CALL,
    TINY_COPY_BYTES,
    TINY_SUITE,
    Case,
    case_label,
)


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch



def parse_threads(text):
    out = []
    for item in text.split(","):
        item = item.strip()
        n = all_threads() if item == "all" else int(item)
        if n < 1:
            raise ValueError(f"thread counts must be >= 1, got {n}")
        if n not in out:
            out.append(n)
    return out


Config = namedtuple("Config", "suite_name cases ops dtypes threads repeats copy_bytes "
                              "bandwidth anchors")


def parse_anchors(text):
    """The --anchors option: None for every importable anchor ("auto"), [] for "none",
    else the listed keys (ValueError on an unknown one)."""
    text = (text or "auto").strip()
    if text == "auto":
        return None
    if text == "none":
        return []
    keys = [k.strip() for k in text.split(",") if k.strip()]
    known = [k for k, _, _ in anchor_mod.ANCHORS]
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"unknown anchor(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(known)}, auto or none")
    return keys


def resolve_anchors(cfg):
    """{key: version} of the anchors this run times: those asked for (all by default)
    that are importable. Before JAX is imported, a run at 1 thread only sizes XLA's
    pool to one thread."""
    if cfg.anchors == []:
        return {}
    if cfg.threads == [1]:
        import sys
        if "jax" not in sys.modules:
            anchor_mod.limit_jax_threads()
    return anchor_mod.available(cfg.anchors)


def bench_config(args):
    """The run the options ask for; ValueError on a bad option."""
    suite_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    suite = {"tiny": TINY_SUITE, "quick": QUICK_SUITE, "full": FULL_SUITE}[suite_name]
    ops = list(OPS) if args.ops is None else [o.strip() for o in args.ops.split(",")]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"--ops: unknown op(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(OPS)}")
    dtypes = args.dtypes or ("float32,float64" if suite_name == "full" else "float32")
    dtypes = [d.strip() for d in dtypes.split(",")]
    if not set(dtypes) <= {"float32", "float64"}:
        raise ValueError("--dtypes: float32 and/or float64")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    try:
        threads = parse_threads(args.threads)
    except ValueError as e:
        raise ValueError(f"--threads: {e}") from None
    try:
        anchor_keys = parse_anchors(getattr(args, "anchors", None))
    except ValueError as e:
        raise ValueError(f"--anchors: {e}") from None
    return Config(suite_name, [c for c in suite if c.op in ops], ops, dtypes, threads,
                  args.repeats or (7 if suite_name == "full" else 3),
                  TINY_COPY_BYTES if args.tiny else copy_array_bytes(), args.bandwidth,
                  anchor_keys)


def _meta(cn, torch, cfg, anchors=None):
    import cynorm._kernels as kernels
    from cynorm._kernels.runtime import openmp_enabled
    return {
        "anchors": {anchor_mod.LABELS[k]: v for k, v in (anchors or {}).items()},
        "cynorm": cn.__version__, "numpy": np.__version__, "kernels": kernels.LEVEL,
        "torch": torch.__version__ if torch else None, "openmp": openmp_enabled(),
        "python": platform.python_version(), "cpu": _cpu_name(), "cores": all_threads(),
        "llc_bytes": llc_bytes(), "copy_array_bytes": cfg.copy_bytes,
        "suite": cfg.suite_name, "threads": cfg.threads, "dtypes": cfg.dtypes,
        "repeats": cfg.repeats, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_bench(cfg, json_path=None, plot_path=None):
    import cynorm as cn

    torch = _import_torch()
    skipped = []
    for op in cfg.ops:
        try:
            cynorm_op(cn, Case(op, (2, 2, 2), 1))
        except Missing as e:
            skipped.append(f"{op}: skipped, {e}")
    runnable = [op for op in cfg.ops if not any(s.startswith(op + ":") for s in skipped)]
    cases = [c for c in cfg.cases if c.op in runnable]

    anchors = resolve_anchors(cfg)
    meta = _meta(cn, torch, cfg, anchors)
    print(f"cynorm {meta['cynorm']}  numpy {meta['numpy']}  "
          f"torch {meta['torch'] or '(not installed)'}  "
          f"OpenMP {'on' if meta['openmp'] else 'off'}  kernels {meta['kernels']}")
    if anchors:
        print("anchors: " + "; ".join(f"{k} {v}" for k, v in meta["anchors"].items()))
    print(f"CPU: {meta['cpu']}, {meta['cores']} usable cores; L3 "
          f"{(meta['llc_bytes'] or 0) >> 20} MiB; threads {cfg.threads}; "
          f"median of {cfg.repeats} repeats")
    for s in skipped:
        print("note: " + s)
    if torch is None:
        print("note: torch is not importable; torch columns are empty")

    copy_bw = copy_bandwidth(cfg.threads, cfg.copy_bytes, cfg.repeats)
    print(f"copy bandwidth (parallel_copy, 2 x {cfg.copy_bytes >> 20} MiB): "
          + ", ".join(f"{n} thr {bw:.1f} GB/s" for n, bw in copy_bw.items()) + "\n")

    rng = np.random.default_rng(0)
    avail = available_memory()
    progress = Progress(len(cases) * len(cfg.dtypes) * len(cfg.threads) * len(PASSES))
    rows = []
    for case in cases:
        for dtype in cfg.dtypes:
            need = 16 * math.prod(case.shape) * np.dtype(dtype).itemsize
            if avail is not None and need > avail:
                skipped.append(f"{case.op} {case_label(case)} {dtype}: skipped, needs "
                               f"~{need >> 20} MiB, {avail >> 20} MiB available")
                continue
            rows += bench_case(case, dtype, cfg.threads, cfg.repeats, cn, torch, copy_bw,
                               rng, progress, anchors=list(anchors), notes=skipped)
    progress.close()
    tiny_rows = []
    if TINY_CALL.op in runnable and cfg.suite_name != "tiny":
        tiny_rows = bench_case(TINY_CALL, "float32", cfg.threads, max(cfg.repeats, 5),
                               cn, torch, copy_bw, rng)

    bw_rows = []
    if cfg.suite_name == "full" or cfg.bandwidth:
        bw_cases = [c for c in bandwidth_cases(cfg.copy_bytes) if c.op in runnable]
        bw_rows = bench_bandwidth(bw_cases, cfg.threads, cfg.repeats, cn, copy_bw, rng)

    summary = geomean_summary(rows, cfg.threads)
    others = anchor_summaries(rows, cfg.threads, list(anchors))
    print_report(rows, tiny_rows, summary, cfg.threads, list(anchors), others)
    if bw_rows:
        print(f"\nfloat32 arrays of {cfg.copy_bytes >> 20} MiB (as the copy's), out=: GB/s "
              "moved (fwd: x, y; bwd: dy, x, dx) and % of the copy bandwidth")
        print_table(bw_rows, BANDWIDTH_COLUMNS)
    for s in skipped:
        print("note: " + s)
    if json_path:
        _write_json(json_path, {
            "meta": meta,
            "copy_bandwidth_gbps": {str(n): bw for n, bw in copy_bw.items()},
            "results": rows,
            "tiny_call": tiny_rows,
            "bandwidth": bw_rows,
            "summary_geomean_torch_over_cynorm": [
                {k if isinstance(k, str) else f"{k}_threads": v for k, v in s.items()}
                for s in summary],
            "summary_geomean_anchor_over_cynorm": {
                anchor_mod.LABELS[k]: [{kk if isinstance(kk, str) else f"{kk}_threads": v
                                        for kk, v in s.items()} for s in summ]
                for k, summ in others.items()},
            "skipped": skipped,
        })
        print(f"\nwrote {json_path}")
    if plot_path:
        if write_plot(plot_path, rows, copy_bw) is not None:
            print(f"wrote {plot_path}")
        else:
            print("note: matplotlib is not importable; no plot written "
                  "(pip install cynorm[plot])")
    return 0



def add_parser(sub):
    """The `bench` subcommand's options, on an argparse subparsers object."""
    b = sub.add_parser(
        "bench", help="benchmark cynorm against PyTorch (CPU), NumPy and the optional "
                      "anchors (ONNX Runtime, OpenVINO, JAX)",
        description="Time every op, forward and forward+backward, for cynorm, PyTorch "
                    "(CPU, if importable), NumPy and, where importable, ONNX Runtime, "
                    "OpenVINO and JAX jit on the same arrays; report medians, other/cynorm "
                    "ratios and GB/s against the copy bandwidth.")
    b.add_argument("--quick", action="store_true",
                   help="a reduced suite (float32, 3 repeats), about a minute on 2 cores")
    b.add_argument("--ops", help=f"comma list of ops (default: all of {','.join(OPS)})")
    b.add_argument("--threads", default="1,all",
                   help="comma list of thread counts; 'all' = usable cores (default 1,all)")
    b.add_argument("--dtypes", help="comma list (default float32,float64; "
                                    "--quick: float32)")
    b.add_argument("--repeats", type=int, help="timed repeats per case, median reported "
                                               "(default 7; --quick: 3)")
    b.add_argument("--json", metavar="PATH", help="write all raw medians as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    b.add_argument("--bandwidth", action="store_true",
                   help="also time forward and backward with out= on arrays far larger "
                        "than the cache (always on in the full suite)")
    b.add_argument("--fused", action="store_true",
                   help="time the fused blocks instead (GroupNorm+SiLU, residual add + "
                        "LayerNorm/RMSNorm, float32) against torch's unfused composites "
                        "and cynorm's normalization alone; with --quick, fewer shapes")
    b.add_argument("--torch-modules", action="store_true",
                   help="run the torch module section instead: each cynorm.torch module "
                        "against its torch.nn twin (suite shapes, tiny calls by minimum "
                        "and p90, a mixed conv model), inference and training step; "
                        "a few minutes with --quick")
    b.add_argument("--anchors", default="auto",
                   help="optional comparison columns: a comma list of ort (ONNX Runtime), "
                        "ov (OpenVINO), jax (JAX jit); 'auto' (default) = each one that is "
                        "importable, 'none' = torch only. Each is checked against the "
                        "float64 reference before it is timed. JAX runs only at the "
                        "thread count its pool has (all cores; 1 with --threads 1)")
    b.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return b


def run(args, parser):
    """Run the benchmark the parsed options ask for; a bad option exits via parser."""
    try:
        cfg = bench_config(args)
    except ValueError as e:
        parser.error(str(e))
    if args.plot and not have_matplotlib():
        # at once, not after minutes of measuring
        parser.error("--plot needs matplotlib: pip install cynorm[plot] "
                     "(or pip install matplotlib)")
    if args.fused:
        return run_fused_bench(cfg, args.json)
    if args.torch_modules:
        return run_torch_module_section(cfg, args.json, parser)
    return run_bench(cfg, args.json, args.plot)


def run_torch_module_section(cfg, json_path, parser):
    """`--torch-modules`: the cynorm.torch section alone (cynorm.bench.torch_modules)."""
    import cynorm as cn

    torch = _import_torch()
    if torch is None:
        parser.error("--torch-modules needs PyTorch (pip install torch)")
    from cynorm.bench.torch_modules import run_torch_modules

    ops = set(cfg.ops)
    cases = [c for c in cfg.cases if c.op in ops]
    meta = _meta(cn, torch, cfg)
    print(f"cynorm {meta['cynorm']}  torch {meta['torch']}  CPU: {meta['cpu']}, "
          f"{meta['cores']} usable cores; threads {cfg.threads}; "
          f"median of {cfg.repeats} repeats\n")
    doc = run_torch_modules(cfg.suite_name, cases, cfg.threads, cfg.repeats, cn, torch)
    if json_path:
        _write_json(json_path, {"meta": meta, "torch_modules": doc})
        print(f"\nwrote {json_path}")
    return 0


def run_fused_bench(cfg, json_path=None):
    """The fused-block suite (cynorm.bench.fused) with the run's threads and repeats."""
    import cynorm as cn
    from cynorm.bench.fused import FUSED_ANCHORS, header, print_fused_report, run_fused, \
        summary

    torch = _import_torch()
    anchors = {k: v for k, v in resolve_anchors(cfg).items() if k in FUSED_ANCHORS}
    meta = _meta(cn, torch, cfg, anchors)
    print(f"fused blocks, float32; cynorm {meta['cynorm']}, torch "
          f"{meta['torch'] or '(not installed)'}; CPU: {meta['cpu']}, {meta['cores']} "
          f"cores; threads {cfg.threads}; median of {cfg.repeats} repeats; times in ms")
    if anchors:
        print("anchors (allocating rows; time over cynorm's fused time): "
              + "; ".join(f"{k} {v}" for k, v in meta["anchors"].items()))
    print(header(list(anchors)))
    notes = []
    rows = run_fused(cn, torch, cfg.threads, cfg.repeats, quick=cfg.suite_name != "full",
                     tiny=cfg.suite_name == "tiny", anchors=list(anchors), notes=notes)
    print_fused_report(rows, cfg.threads, list(anchors))
    for m in notes:
        print("note: " + m)
    if json_path:
        _write_json(json_path, {"meta": meta, "fused": rows, "notes": notes,
                                "summary": summary(rows, cfg.threads)})
        print(f"\nwrote {json_path}")
    return 0
