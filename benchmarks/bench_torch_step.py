"""The tiny training step of cynorm.torch against torch.nn, and what it is made of.

    PYTHONPATH=$PWD python benchmarks/bench_torch_step.py [--samples N] [--threads T]

A training step is `module(x).backward(dy)` with x and the parameters requiring grad
(their .grad cleared first), as in `python -m cynorm bench --torch-modules`. Each case
times, taking turns in rounds (minimum per call over many short samples; torch's small
ops on a loaded machine are bimodal, so the minimum is what compares):

  torch        torch.nn's module
  cynorm.torch cynorm.torch's module
  floor        a torch.autograd.Function that does nothing but return empty tensors of
               the right shapes (output, input and parameter gradients), called the way
               cynorm.torch calls its own: what any Python autograd Function costs here
               before a kernel runs
  kernels      the NumPy API's forward (return_stats=True) and backward on the same
               arrays, outside autograd

and prints per-case microseconds and torch / cynorm.torch. A few minutes with the
default 3000 samples.
"""
import argparse
import gc
import time

import numpy as np
import torch

import cynorm
import cynorm.torch as ct

CASES = [  # (label, make(ns), shape)
    ("GroupNorm(32)", lambda ns: ns.GroupNorm(32, 32), (1, 32, 8, 8)),
    ("GroupNorm(8)", lambda ns: ns.GroupNorm(8, 32), (1, 32, 8, 8)),
    ("LayerNorm(768)", lambda ns: ns.LayerNorm(768), (1, 768)),
    ("BatchNorm1d(64)", lambda ns: ns.BatchNorm1d(64), (4, 64)),
    ("LayerNorm(1024)", lambda ns: ns.LayerNorm(1024), (64, 1024)),
    ("GroupNorm(32) 64ch", lambda ns: ns.GroupNorm(32, 64), (1, 64, 32, 32)),
]


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.shapes = (w, b)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        w, b = ctx.shapes
        return torch.empty_like(dy), torch.empty_like(w), torch.empty_like(b)


def _step(module, x, dy):
    params = list(module.parameters())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(dy)
    return step


def _floor(module, x, dy):
    w, b = module.weight, module.bias

    def step():
        x.grad = None
        w.grad = None
        b.grad = None
        _Floor.apply(x, w, b).backward(dy)
    return step


def _kernels(label, module, x, dy):
    xn, dyn = x.detach().numpy(), dy.numpy()
    w, b = module.weight.detach().numpy(), module.bias.detach().numpy()
    if label.startswith("GroupNorm"):
        G = module.num_groups

        def run():
            _, m, r = cynorm.group_norm(xn, G, w, b, 1e-5, return_stats=True)
            cynorm.group_norm_backward(dyn, xn, m, r, G, w)
    elif label.startswith("LayerNorm"):
        ns = xn.shape[-1:]

        def run():
            _, m, r = cynorm.layer_norm(xn, ns, w, b, 1e-5, return_stats=True)
            cynorm.layer_norm_backward(dyn, xn, m, r, ns, w)
    else:
        rm, rv = module.running_mean.numpy().copy(), module.running_var.numpy().copy()

        def run():
            _, m, r = cynorm.batch_norm(xn, rm, rv, w, b, True, 0.1, 1e-5,
                                        return_stats=True)
            cynorm.batch_norm_backward(dyn, xn, m, r, w, True)
    return run


def minimum_calls(fns, samples, loops=4, rounds=6):
    """Minimum per-call seconds over `samples` samples of `loops` calls each, the
    functions taking turns in `rounds` rounds (garbage collection off)."""
    best = {name: float("inf") for name in fns}
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in fns.items():
                for _ in range(10):
                    fn()
                clock = time.perf_counter
                for _ in range(max(1, samples // rounds)):
                    t0 = clock()
                    for _ in range(loops):
                        fn()
                    best[name] = min(best[name], (clock() - t0) / loops)
    finally:
        gc.enable()
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from cynorm.bench.timing import thread_count
    with thread_count(args.threads, torch):
        run(args)


def run(args):
    print(f"cynorm {cynorm.__version__}  torch {torch.__version__}  threads "
          f"{args.threads}; training step module(x).backward(dy), float32; microseconds, "
          f"minimum of {args.samples} samples")
    print(f"{'case':20s} {'shape':16s} {'torch':>7s} {'cy.torch':>8s} {'floor':>7s} "
          f"{'kernels':>7s} {'torch/cy.torch':>14s}")
    for label, make, shape in CASES:
        g = torch.Generator().manual_seed(0)
        theirs = make(torch.nn)
        ours = make(ct)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(shape, generator=g).requires_grad_()
        dy = torch.randn(shape, generator=g)
        fns = {"torch": _step(theirs, x, dy), "cynorm.torch": _step(ours, x, dy),
               "floor": _floor(ours, x, dy), "kernels": _kernels(label, ours, x, dy)}
        t = {k: v * 1e6 for k, v in minimum_calls(fns, args.samples).items()}
        print(f"{label:20s} {str(shape).replace(' ', ''):16s} {t['torch']:7.1f} "
              f"{t['cynorm.torch']:8.1f} {t['floor']:7.1f} {t['kernels']:7.1f} "
              f"{t['torch'] / t['cynorm.torch']:14.2f}")


if __name__ == "__main__":
    main()
