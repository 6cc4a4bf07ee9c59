"""The implementations each case is timed on: cynorm, PyTorch (CPU) and plain NumPy, each
as zero-argument callables on the same arrays."""
import numpy as np

from cynorm.bench.reference import numpy_backward, numpy_forward
from cynorm.bench.suite import EPS


class Missing(Exception):
    """An op that this build of cynorm (or torch) does not provide yet."""


def cynorm_op(cn, case):
    """(forward, backward) for one case, with a uniform signature:
    forward(x, w, b, **kw) -> what the op returns (kw: out=, return_stats=);
    backward(dy, x, stats, w, **kw) -> the gradients (stats: what return_stats gave
    after y)."""
    f = getattr(cn, case.op, None)
    fb = getattr(cn, case.op + "_backward", None)
    if f is None or fb is None:
        raise Missing(f"cynorm.{case.op if f is None else case.op + '_backward'} "
                      "is not available in this build")
    op = case.op
    if op == "group_norm":
        G = case.groups
        return (lambda x, w, b, **kw: f(x, G, w, b, **kw),
                lambda dy, x, st, w, **kw: fb(dy, x, *st, G, w, **kw))
    if op == "instance_norm":
        return (lambda x, w, b, **kw: f(x, weight=w, bias=b, **kw),
                lambda dy, x, st, w, **kw: fb(dy, x, *st, weight=w, **kw))
    if op == "batch_norm":  # training mode, running statistics updated as users do
        C = case.shape[1]
        rm, rv = np.zeros(C), np.ones(C)
        return (lambda x, w, b, **kw: f(x, rm, rv, w, b, training=True, **kw),
                lambda dy, x, st, w, **kw: fb(dy, x, *st, w, training=True, **kw))
    K = case.shape[-1]
    if op == "layer_norm":
        return (lambda x, w, b, **kw: f(x, K, w, b, **kw),
                lambda dy, x, st, w, **kw: fb(dy, x, *st, K, w, **kw))
    return (lambda x, w, b, **kw: f(x, K, w, **kw),  # rms_norm: no bias
            lambda dy, x, st, w, **kw: fb(dy, x, *st, K, w, **kw))


def torch_op(torch, case, dtype):
    """forward(x, w, b) on tensors, as torch.nn.functional computes the op."""
    F = torch.nn.functional
    op = case.op
    if op == "group_norm":
        return lambda x, w, b: F.group_norm(x, case.groups, w, b, EPS)
    if op == "instance_norm":
        return lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=EPS)
    if op == "batch_norm":
        C = case.shape[1]
        tdtype = torch.float32 if np.dtype(dtype) == np.float32 else torch.float64
        rm, rv = torch.zeros(C, dtype=tdtype), torch.ones(C, dtype=tdtype)
        return lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=True, eps=EPS)
    K = (case.shape[-1],)
    if op == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, K, w, b, EPS)
    if not hasattr(F, "rms_norm"):
        raise Missing(f"torch {torch.__version__} has no rms_norm")
    return lambda x, w, b: F.rms_norm(x, K, w, eps=None)


def _impls(case, cn, torch, x, dy, w, b):
    """{pass: {column: zero-argument callable}} for one case on the given arrays."""
    fwd, bwd = cynorm_op(cn, case)
    y_buf, dx_buf = np.empty_like(x), np.empty_like(x)

    def cy_fwd_bwd():
        y, *stats = fwd(x, w, b, return_stats=True)
        bwd(dy, x, stats, w)

    def cy_fwd_bwd_out():
        y, *stats = fwd(x, w, b, return_stats=True, out=y_buf)
        bwd(dy, x, stats, w, out=dx_buf)

    impls = {
        "fwd": {"cynorm": lambda: fwd(x, w, b),
                "cynorm_out": lambda: fwd(x, w, b, out=y_buf)},
        "fwd+bwd": {"cynorm": cy_fwd_bwd, "cynorm_out": cy_fwd_bwd_out},
    }
    if torch is not None:
        try:
            tf = torch_op(torch, case, x.dtype)
        except Missing:
            tf = None
        if tf is not None:
            t = {k: None if a is None else torch.from_numpy(a) for k, a in
                 (("x", x), ("dy", dy), ("w", w), ("b", b))}
            # leaves sharing memory with x, w, b for the autograd pass
            leaves = [a.detach().requires_grad_() for a in (t["x"], t["w"], t["b"])
                      if a is not None]
            xg, wg, bg = (leaves + [None])[:3]

            def torch_fwd_bwd():
                for leaf in leaves:
                    leaf.grad = None
                tf(xg, wg, bg).backward(t["dy"])

            impls["fwd"]["torch"] = lambda: tf(t["x"], t["w"], t["b"])
            impls["fwd+bwd"]["torch"] = torch_fwd_bwd
    impls["fwd"]["numpy"] = lambda: numpy_forward(case, x, w, b)
    impls["fwd+bwd"]["numpy"] = lambda: numpy_backward(
        case, dy, numpy_forward(case, x, w, b)[1], w)
    return impls

