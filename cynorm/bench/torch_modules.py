"""The "torch module" section (`python -m cynorm bench --torch-modules`): each
cynorm.torch module against its torch.nn twin, with the same parameters, on the same
tensors, in inference (`torch.no_grad()`, eval mode) and in a training step (forward and
backward, input and parameters requiring grad).

Three parts:
  suite  the bench suite's shapes, one module each: medians, torch / cynorm.torch
         ratios, and the NumPy API's own ratio (torch module / cynorm function) beside it;
  tiny   (1,32,8,8) GroupNorm(32), (1,768) LayerNorm, (4,64) BatchNorm1d: tiny calls,
         compared by the minimum over many short samples (torch's small ops on a loaded
         machine are bimodal: an OpenMP worker descheduled stalls a call for
         milliseconds), with each library's p90 reported separately, and cynorm.torch's
         overhead over the NumPy API (minimum against minimum);
  mixed  a small convolutional network whose norms are cynorm.torch's against the same
         network with torch.nn's: cynorm must not slow down the torch ops around it.
"""
import gc
import math
import time

from cynorm.bench.report import print_table
from cynorm.bench.suite import EPS, Case, case_label
from cynorm.bench.timing import _warm, thread_count, time_calls

TINY_MODULE_CASES = [  # (label, op, shape, groups)
    ("GroupNorm(32)", "group_norm", (1, 32, 8, 8), 32),
    ("LayerNorm(768)", "layer_norm", (1, 768), None),
    ("BatchNorm1d(64)", "batch_norm", (4, 64), None),
]
MODES = ("inference", "training")


def make_modules(ct, torch, op, shape, groups, dtype):
    """(cynorm.torch module, torch.nn module) with the same non-trivial parameters."""
    C = shape[1] if len(shape) > 1 else shape[0]
    nd = len(shape) - 2
    if op == "group_norm":
        pair = ct.GroupNorm(groups, C), torch.nn.GroupNorm(groups, C)
    elif op == "instance_norm":
        cls = ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")[max(nd, 1) - 1]
        pair = (getattr(ct, cls)(C, affine=True, eps=EPS),
                getattr(torch.nn, cls)(C, affine=True, eps=EPS))
    elif op == "batch_norm":
        cls = ("BatchNorm1d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d")[max(nd, 0)]
        pair = getattr(ct, cls)(C, eps=EPS), getattr(torch.nn, cls)(C, eps=EPS)
    elif op == "layer_norm":
        pair = ct.LayerNorm(shape[-1], eps=EPS), torch.nn.LayerNorm(shape[-1], eps=EPS)
    else:
        pair = ct.RMSNorm(shape[-1]), torch.nn.RMSNorm(shape[-1])
    ours, theirs = (m.to(dtype) for m in pair)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _numpy_call(cn, op, module, x, groups):
    """The NumPy API's call for the module's inference forward, on the same memory."""
    w = None if module.weight is None else module.weight.detach().numpy()
    b = getattr(module, "bias", None)
    b = None if b is None else b.detach().numpy()
    xn = x.numpy()
    if op == "group_norm":
        return lambda: cn.group_norm(xn, groups, w, b, EPS)
    if op == "instance_norm":
        return lambda: cn.instance_norm(xn, weight=w, bias=b, eps=EPS)
    if op == "batch_norm":
        rm, rv = module.running_mean.numpy(), module.running_var.numpy()
        return lambda: cn.batch_norm(xn, rm, rv, w, b, False, 0.1, EPS)
    if op == "layer_norm":
        return lambda: cn.layer_norm(xn, xn.shape[-1:], w, b, EPS)
    return lambda: cn.rms_norm(xn, xn.shape[-1:], w)


def _callables(torch, module, x, dy, mode):
    """A call of the module in one mode: inference (eval, no_grad) or a training step
    (train mode, forward and backward into the input's and parameters' .grad)."""
    if mode == "inference":
        module.eval()

        def infer():
            with torch.no_grad():
                return module(x)
        return infer
    module.train()
    xg = x.clone().requires_grad_()

    def step():
        xg.grad = None
        for p in module.parameters():
            p.grad = None
        module(xg).backward(dy)
    return step


def bench_suite_modules(cases, dtype, threads, repeats, cn, ct, torch):
    rows = []
    for case in cases:
        x = torch.randn(case.shape, generator=torch.Generator().manual_seed(1),
                        dtype=dtype) * 2 + 0.5
        dy = torch.randn(case.shape, generator=torch.Generator().manual_seed(2),
                         dtype=dtype)
        ours, theirs = make_modules(ct, torch, case.op, case.shape, case.groups, dtype)
        for n in threads:
            with thread_count(n, torch):
                for mode in MODES:
                    fns = {"cynorm.torch": _callables(torch, ours, x, dy, mode),
                           "torch": _callables(torch, theirs, x, dy, mode)}
                    if mode == "inference":
                        fns["numpy api"] = _numpy_call(cn, case.op, ours, x, case.groups)
                    t = time_calls(fns, repeats)
                    rows.append({
                        "op": case.op, "shape": list(case.shape), "groups": case.groups,
                        "dtype": str(dtype).replace("torch.", ""), "threads": n,
                        "mode": mode, "torch_s": t["torch"],
                        "cynorm_torch_s": t["cynorm.torch"],
                        "numpy_api_s": t.get("numpy api"),
                        "torch_over_cynorm_torch": t["torch"] / t["cynorm.torch"],
                        "torch_over_numpy_api": (t["torch"] / t["numpy api"]
                                                 if "numpy api" in t else None),
                    })
    return rows


def sample_calls(fns, samples, loops=4, rounds=4):
    """Per-call seconds of many short samples (each `loops` calls) of every function in
    `fns`, taking turns in `rounds` rounds after a warm-up: {name: sorted samples}."""
    out = {name: [] for name in fns}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                _warm(fn)
                clock = time.perf_counter
                for _ in range(-(-samples // rounds)):
                    t0 = clock()
                    for _ in range(loops):
                        fn()
                    out[name].append((clock() - t0) / loops)
    finally:
        if was_enabled:
            gc.enable()
    return {name: sorted(s) for name, s in out.items()}


def _p90(s):
    return s[min(len(s) - 1, int(0.9 * len(s)))]


def bench_tiny_modules(threads, samples, cn, ct, torch):
    rows = []
    for label, op, shape, groups in TINY_MODULE_CASES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        ours, theirs = make_modules(ct, torch, op, shape, groups, torch.float32)
        for n in threads:
            with thread_count(n, torch):
                for mode in MODES:
                    fns = {"cynorm.torch": _callables(torch, ours, x, dy, mode),
                           "torch": _callables(torch, theirs, x, dy, mode)}
                    if mode == "inference":
                        fns["numpy api"] = _numpy_call(cn, op, ours, x, groups)
                    s = sample_calls(fns, samples)
                    row = {"module": label, "shape": list(shape), "threads": n,
                           "mode": mode}
                    for name, key in (("torch", "torch"), ("cynorm.torch", "cynorm_torch"),
                                      ("numpy api", "numpy_api")):
                        row[key + "_min_s"] = s[name][0] if name in s else None
                        row[key + "_p90_s"] = _p90(s[name]) if name in s else None
                    row["overhead_over_numpy_api_s"] = (
                        row["cynorm_torch_min_s"] - row["numpy_api_min_s"]
                        if mode == "inference" else None)
                    rows.append(row)
    return rows


def _mixed_model(norms, torch, width):
    C = width
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, C, 3, padding=1), norms.GroupNorm(8, C), torch.nn.ReLU(),
        torch.nn.Conv2d(C, C, 3, padding=1), norms.BatchNorm2d(C), torch.nn.ReLU(),
        torch.nn.Conv2d(C, C, 3, padding=1), norms.GroupNorm(8, C), torch.nn.ReLU(),
        torch.nn.Conv2d(C, C, 3, padding=1), norms.BatchNorm2d(C), torch.nn.ReLU(),
    )


MIXED_SHAPES = [(1, 3, 32, 32, 32), (4, 3, 64, 64, 32)]  # (N, 3, H, W, width)


def bench_mixed(threads, repeats, ct, torch, shapes=MIXED_SHAPES):
    rows = []
    for N, cin, H, W, width in shapes:
        theirs = _mixed_model(torch.nn, torch, width)
        ours = _mixed_model(ct, torch, width)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(N, cin, H, W, generator=torch.Generator().manual_seed(1))
        dy = torch.randn(N, width, H, W, generator=torch.Generator().manual_seed(2))
        for n in threads:
            with thread_count(n, torch):
                for mode in MODES:
                    fns = {"cynorm.torch": _callables(torch, ours, x, dy, mode),
                           "torch": _callables(torch, theirs, x, dy, mode)}
                    t = time_calls(fns, repeats)
                    rows.append({"input": [N, cin, H, W], "width": width, "threads": n,
                                 "mode": mode, "torch_s": t["torch"],
                                 "cynorm_torch_s": t["cynorm.torch"],
                                 "torch_over_cynorm_torch": t["torch"] / t["cynorm.torch"]})
    return rows


def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summary(rows, threads):
    out = []
    ops = list(dict.fromkeys(r["op"] for r in rows))
    for op in ops:
        for mode in MODES:
            line = {"op": op, "mode": mode}
            for n in threads:
                sel = [r for r in rows if r["op"] == op and r["mode"] == mode
                       and r["threads"] == n]
                line[f"{n}_module"] = _geomean([r["torch_over_cynorm_torch"] for r in sel])
                line[f"{n}_api"] = _geomean([r["torch_over_numpy_api"] for r in sel])
            out.append(line)
    return out


def _us(key):
    return lambda r: None if r.get(key) is None else r[key] * 1e6


def _ms(key):
    return lambda r: None if r.get(key) is None else r[key] * 1e3


def run_torch_modules(suite_name, suite, threads, repeats, cn, torch):
    """Run and print the section over the bench suite's cases `suite`; returns its JSON
    document."""
    import cynorm.torch as ct

    samples = {"tiny": 40, "quick": 400, "full": 2000}[suite_name]
    dtype = torch.float32
    print("torch module section: cynorm.torch modules against their torch.nn twins, "
          "float32; inference = eval mode under no_grad, training = forward + backward")
    rows = bench_suite_modules(suite, dtype, threads, repeats, cn, ct, torch)
    print_table(rows, [
        ("op", "op", ""), ("shape", lambda r: case_label(_case(r)), ""),
        ("thr", "threads", "d"), ("mode", "mode", ""),
        ("torch ms", _ms("torch_s"), ".3f"), ("cy.torch ms", _ms("cynorm_torch_s"), ".3f"),
        ("numpy api ms", _ms("numpy_api_s"), ".3f"),
        ("torch/cy.torch", "torch_over_cynorm_torch", ".2f"),
        ("torch/api", "torch_over_numpy_api", ".2f")])
    summ = summary(rows, threads)
    print("\ngeometric mean of torch module / cynorm.torch module (module) and of torch "
          "module / cynorm NumPy function (api, inference only); > 1: cynorm is faster")
    print_table(summ, [("op", "op", ""), ("mode", "mode", "")]
                + [c for n in threads for c in ((f"{n} thr module", f"{n}_module", ".2f"),
                                                 (f"{n} thr api", f"{n}_api", ".2f"))])

    tiny = bench_tiny_modules(threads, samples, cn, ct, torch)
    print(f"\ntiny calls, float32, microseconds per call: minimum and p90 of {samples} "
          "samples of 4 calls each library; overhead = cynorm.torch min - NumPy API min")
    print_table(tiny, [
        ("module", "module", ""), ("thr", "threads", "d"), ("mode", "mode", ""),
        ("torch min", _us("torch_min_s"), ".1f"), ("torch p90", _us("torch_p90_s"), ".1f"),
        ("cy.torch min", _us("cynorm_torch_min_s"), ".1f"),
        ("cy.torch p90", _us("cynorm_torch_p90_s"), ".1f"),
        ("api min", _us("numpy_api_min_s"), ".1f"), ("api p90", _us("numpy_api_p90_s"), ".1f"),
        ("overhead", _us("overhead_over_numpy_api_s"), ".1f")])

    shapes = MIXED_SHAPES[:1] if suite_name == "tiny" else MIXED_SHAPES
    mixed = bench_mixed(threads, repeats, ct, torch, shapes)
    print("\nmixed model: 4 x (Conv2d 3x3, norm, ReLU), norms GroupNorm(8)/BatchNorm2d "
          "alternating, cynorm.torch against torch.nn; milliseconds")
    print_table(mixed, [
        ("input", lambda r: "(" + ",".join(map(str, r["input"])) + ")", ""),
        ("width", "width", "d"), ("thr", "threads", "d"), ("mode", "mode", ""),
        ("torch ms", _ms("torch_s"), ".3f"), ("cy.torch ms", _ms("cynorm_torch_s"), ".3f"),
        ("torch/cy.torch", "torch_over_cynorm_torch", ".2f")])
    return {"suite": rows, "summary": [{k if isinstance(k, str) else str(k): v
                                        for k, v in s.items()} for s in summ],
            "tiny": tiny, "mixed": mixed}


def _case(row):
    return Case(row["op"], tuple(row["shape"]), row["groups"])
