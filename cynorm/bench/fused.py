"""`python -m cynorm bench --fused`: the fused blocks side by side.

GroupNorm(32)+SiLU and residual add + LayerNorm / RMSNorm, float32, for each thread count:
cynorm's fused call against torch's unfused composite (`F.silu(F.group_norm(...))`,
`F.layer_norm(x + r, ...)`) and against cynorm's normalization alone on the same shape,
forward and forward+backward, each library allocating its outputs as users do, and again
with preallocated outputs (cynorm `out=`/`residual_out=`; torch's in-place activation and
`torch.add(out=)`, as far as torch allows). Ratios > 1 in "torch/cn" mean cynorm is faster;
"fused/alone" is what the epilogue costs over the bare normalization.
"""
import math

import numpy as np

from cynorm.bench.anchors import LABELS, fused_anchor_calls
from cynorm.bench.timing import thread_count, time_calls

GN_SHAPES = [(2, 320, 64, 64), (4, 128, 64, 64), (8, 256, 56, 56), (1, 512, 128, 128),
             (1, 64, 32, 32)]
ROW_SHAPES = [(4096, 768), (512, 4096), (2048, 1024)]
GROUPS = 32


TINY_CASES = [("gn_silu", (1, 32, 8, 8)), ("add_layer_norm", (8, 64)),
              ("add_rms_norm", (8, 64))]


def fused_cases(quick=False, tiny=False):
    """(block, shape) pairs: gn_silu, add_layer_norm, add_rms_norm."""
    if tiny:
        return TINY_CASES
    gn = GN_SHAPES[1:2] + GN_SHAPES[4:] if quick else GN_SHAPES
    rows = ROW_SHAPES[:1] if quick else ROW_SHAPES
    return ([("gn_silu", s) for s in gn] + [("add_layer_norm", s) for s in rows]
            + [("add_rms_norm", s) for s in rows])


class _Calls(dict):
    """{name: fn}, with .arrays: the block's inputs (for the anchors)."""


def _gn_calls(cn, torch, shape, rng, out_mode):
    """{name: fn} for one GroupNorm+SiLU shape: forward and forward+backward."""
    C = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    b = (0.1 * rng.standard_normal(C)).astype(np.float32)
    y = np.empty_like(x) if out_mode else None
    dx = np.empty_like(x) if out_mode else None
    calls = _Calls({
        "cn_fused_fwd": lambda: cn.group_norm(x, GROUPS, w, b, out=y, activation="silu"),
        "cn_alone_fwd": lambda: cn.group_norm(x, GROUPS, w, b, out=y),
    })

    def cn_fused_fb():
        yy, m, r = cn.group_norm(x, GROUPS, w, b, out=y, activation="silu",
                                 return_stats=True)
        cn.group_norm_backward(dy, x, m, r, GROUPS, w, out=dx, bias=b, activation="silu")

    def cn_alone_fb():
        yy, m, r = cn.group_norm(x, GROUPS, w, b, out=y, return_stats=True)
        cn.group_norm_backward(dy, x, m, r, GROUPS, w, out=dx)

    calls["cn_fused_fb"] = cn_fused_fb
    calls["cn_alone_fb"] = cn_alone_fb
    calls.arrays = dict(x=x, w=w, b=b, dy=dy)
    if torch is not None:
        F = torch.nn.functional
        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
        wt, bt = torch.from_numpy(w), torch.from_numpy(b)
        xg = xt.clone().requires_grad_()
        wg, bg = wt.clone().requires_grad_(), bt.clone().requires_grad_()
        calls["torch_fwd"] = ((lambda: F.silu(F.group_norm(xt, GROUPS, wt, bt), inplace=True))
                              if out_mode else
                              (lambda: F.silu(F.group_norm(xt, GROUPS, wt, bt))))

        def torch_fb():
            xg.grad = wg.grad = bg.grad = None
            F.silu(F.group_norm(xg, GROUPS, wg, bg)).backward(dyt)

        calls["torch_fb"] = torch_fb
    return calls


def _row_calls(cn, torch, block, shape, rng, out_mode):
    """{name: fn} for one residual add + LayerNorm/RMSNorm shape."""
    K = shape[-1]
    rms = block == "add_rms_norm"
    x = rng.standard_normal(shape, dtype=np.float32)
    r = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    b = None if rms else (0.1 * rng.standard_normal(K)).astype(np.float32)
    y = np.empty_like(x) if out_mode else None
    h = np.empty_like(x) if out_mode else None
    dx = np.empty_like(x) if out_mode else None
    s = x + r

    if rms:
        def norm(v, **kw):
            return cn.rms_norm(v, K, w, 1e-6, **kw)

        def norm_bwd(d, v, stats, **kw):
            return cn.rms_norm_backward(d, v, stats[-1], K, w, **kw)
    else:
        def norm(v, **kw):
            return cn.layer_norm(v, K, w, b, **kw)

        def norm_bwd(d, v, stats, **kw):
            return cn.layer_norm_backward(d, v, stats[-2], stats[-1], K, w, **kw)

    def cn_fused_fb():
        res = norm(x, out=y, residual=r, residual_out=h, return_stats=True)
        norm_bwd(dy, res[1], res, out=dx)

    def cn_alone_fb():
        res = norm(s, out=y, return_stats=True)
        norm_bwd(dy, s, res, out=dx)

    calls = _Calls({
        "cn_fused_fwd": lambda: norm(x, out=y, residual=r, residual_out=h),
        "cn_alone_fwd": lambda: norm(s, out=y),
        "cn_fused_fb": cn_fused_fb,
        "cn_alone_fb": cn_alone_fb,
    })
    calls.arrays = dict(x=x, w=w, b=b, r=r, dy=dy)
    if torch is not None:
        F = torch.nn.functional
        xt, rt, dyt = torch.from_numpy(x), torch.from_numpy(r), torch.from_numpy(dy)
        wt = torch.from_numpy(w)
        bt = None if b is None else torch.from_numpy(b)
        ht = torch.empty_like(xt)

        def tnorm(v, weight, bias):
            if rms:
                return F.rms_norm(v, (K,), weight, 1e-6)
            return F.layer_norm(v, (K,), weight, bias)

        if out_mode:
            calls["torch_fwd"] = lambda: tnorm(torch.add(xt, rt, out=ht), wt, bt)
        else:
            calls["torch_fwd"] = lambda: tnorm(xt + rt, wt, bt)
        xg, rg = xt.clone().requires_grad_(), rt.clone().requires_grad_()
        wg = wt.clone().requires_grad_()
        bg = None if bt is None else bt.clone().requires_grad_()

        def torch_fb():
            xg.grad = rg.grad = wg.grad = None
            if bg is not None:
                bg.grad = None
            tnorm(xg + rg, wg, bg).backward(dyt)

        calls["torch_fb"] = torch_fb
    return calls


def _ratio(a, b):
    return a / b if a and b else float("nan")


FUSED_ANCHORS = ("ov", "jax")  # the anchors with a fused graph (OpenVINO) or jit (JAX)


def run_fused(cn, torch, threads, repeats, quick=False, tiny=False, progress=print,
              anchors=(), notes=None):
    """Time every fused case; a list of result dicts (times in seconds). anchors: keys
    of the optional anchors (cynorm.bench.anchors) timed beside, allocating, in the
    allocating rows only; each is checked against the float64 composite first and
    `notes` receives why one has no cell."""
    rng = np.random.default_rng(0)
    rows = []
    keys = [k for k in anchors if k in FUSED_ANCHORS]
    for block, shape in fused_cases(quick, tiny):
        for out_mode in (False, True):
            if block == "gn_silu":
                calls = _gn_calls(cn, torch, shape, rng, out_mode)
            else:
                calls = _row_calls(cn, torch, block, shape, rng, out_mode)
            for n in threads:
                extra = {}
                with thread_count(n, torch):
                    if keys and not out_mode:
                        a = calls.arrays
                        extra, why = fused_anchor_calls(block, n, keys, a["x"], a["w"],
                                                        a["b"], a.get("r"), a["dy"], GROUPS)
                        if notes is not None:
                            notes += [m for m in why if m not in notes]
                    t = time_calls({**calls, **extra}, repeats)
                row = {"block": block, "shape": list(shape), "threads": n,
                       "out": out_mode, **{k: v for k, v in t.items()}}
                rows.append(row)
                progress(format_row(row, keys))
    return rows


HEADER = (f"{'block':<15}{'shape':<20}{'thr':>4} {'mode':<6}"
          f"{'cn fused':>10}{'cn alone':>10}{'torch':>10}{'torch/cn':>9}{'fused/alone':>12}"
          f"   |{'fwd+bwd cn':>11}{'torch':>10}{'torch/cn':>9}{'fused/alone':>12}")


def header(anchors=()):
    """HEADER with the anchor ratio columns of format_row."""
    return HEADER + _anchor_cells(anchors, None)


def _anchor_cells(anchors, row):
    """The anchors' ratio cells (their time over cynorm's fused time), or their heads."""
    out = "   |" if anchors else ""
    for k in anchors:
        for kind, ours in (("fwd", "cn_fused_fwd"), ("fb", "cn_fused_fb")):
            if kind == "fb" and k != "jax":
                continue
            head = f"{LABELS[k]}/cn" + (" f+b" if kind == "fb" else "")
            if row is None:
                out += f"{head:>{len(head) + 2}}"
            else:
                v = _ratio(row.get(f"{k}_{kind}"), row[ours])
                out += f"{v:{len(head) + 2}.2f}" if v == v else f"{'-':>{len(head) + 2}}"
    return out


def format_row(row, anchors=()):
    ms = lambda v: f"{v * 1e3:10.3f}" if v else f"{'-':>10}"  # noqa: E731
    f, a, t = row["cn_fused_fwd"], row["cn_alone_fwd"], row.get("torch_fwd")
    fb, ab, tb = row["cn_fused_fb"], row["cn_alone_fb"], row.get("torch_fb")
    shape = "x".join(str(d) for d in row["shape"])
    return (f"{row['block']:<15}{shape:<20}{row['threads']:>4} "
            f"{'out=' if row['out'] else 'alloc':<6}{ms(f)}{ms(a)}{ms(t)}"
            f"{_ratio(t, f):9.2f}{_ratio(f, a):12.2f}   |{ms(fb)} {ms(tb)}"
            f"{_ratio(tb, fb):9.2f}{_ratio(fb, ab):12.2f}" + _anchor_cells(anchors, row))


def summary(rows, threads):
    """Geometric means of torch/cynorm (fwd, fwd+bwd) and fused/alone per block and
    thread count, over shapes and both output modes."""
    out = []
    for block in ("gn_silu", "add_layer_norm", "add_rms_norm"):
        for n in threads:
            sel = [r for r in rows if r["block"] == block and r["threads"] == n]
            if not sel:
                continue

            def gm(key_a, key_b):
                vals = [_ratio(r.get(key_a), r.get(key_b)) for r in sel]
                vals = [v for v in vals if v == v]
                return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else float("nan")

            extra = {f"{k}_over_cn_{kind}": gm(f"{k}_{kind}", f"cn_fused_{kind}")
                     for k in ("ov", "jax") for kind in ("fwd", "fb")
                     if any(r.get(f"{k}_{kind}") for r in sel)}
            out.append({"block": block, "threads": n, **extra,
                        "torch_over_cn_fwd": gm("torch_fwd", "cn_fused_fwd"),
                        "torch_over_cn_fwd_bwd": gm("torch_fb", "cn_fused_fb"),
                        "fused_over_alone_fwd": gm("cn_fused_fwd", "cn_alone_fwd"),
                        "fused_over_alone_fwd_bwd": gm("cn_fused_fb", "cn_alone_fb")})
    return out


def print_fused_report(rows, threads, anchors=()):
    keys = [k for k in anchors if k in FUSED_ANCHORS]
    heads = [(f"{LABELS[k]}/cn {'f+b' if kind == 'fb' else kind}", f"{k}_over_cn_{kind}")
             for k in keys for kind in ("fwd", "fb") if kind == "fwd" or k == "jax"]
    print("\ngeometric means over shapes and output modes (anchors: allocating rows):")
    print(f"{'block':<15}{'thr':>4}{'torch/cn fwd':>14}{'torch/cn f+b':>14}"
          f"{'fused/alone fwd':>17}{'fused/alone f+b':>17}"
          + "".join(f"{h:>{len(h) + 2}}" for h, _ in heads))
    for s in summary(rows, threads):
        print(f"{s['block']:<15}{s['threads']:>4}{s['torch_over_cn_fwd']:14.2f}"
              f"{s['torch_over_cn_fwd_bwd']:14.2f}{s['fused_over_alone_fwd']:17.2f}"
              f"{s['fused_over_alone_fwd_bwd']:17.2f}"
              + "".join(f"{s[k]:{len(h) + 2}.2f}" if s.get(k, float("nan")) == s.get(k)
                        else f"{'-':>{len(h) + 2}}" for h, k in heads))
