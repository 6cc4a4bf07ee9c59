"""cynorm.torch.SyncBatchNorm over real process groups: 2 and 3 processes on localhost
(torch.multiprocessing spawn, gloo, a free port on 127.0.0.1) against a single process's
torch.nn.BatchNorm2d on the concatenated batch: outputs, input gradients, parameter
gradients, running statistics, and a short DistributedDataParallel training run.

The process groups are started once per world size (module fixture); each worker saves
what it computed and the tests compare. A hang fails: the collectives and the join have
timeouts. Each rank's stderr goes to a log (with faulthandler's stacks on a fatal
signal), shown when a group fails. A group in which a rank is killed by a signal is
started again, at most twice, with a warning that carries the logs: gloo's TCP transport
can abort a process on a connection that closes under it (an overloaded 2-core machine
made one such abort). A Python error in a rank, a wrong result, a hang, or an abort with
a sanitizer's report in the rank's log is never retried."""
import datetime
import faulthandler
import os
import socket
import sys
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import reference as ref  # noqa: E402

C = 5
SHAPE = (7, C, 6, 5)     # global batch: split unevenly over the ranks
STEPS = 2                # forward/backward steps of the layer test
DDP_BATCH, DDP_STEPS = 12, 4
TIMEOUT_S = 120


def _split(n, world_size):
    """Uneven local batch sizes summing to n (rank 0 gets the fewest)."""
    base, extra = divmod(n, world_size)
    return [base + (1 if r >= world_size - extra else 0) for r in range(world_size)]


def _layer_data(dtype, step):
    rng = np.random.default_rng(100 + step)
    x = (rng.standard_normal(SHAPE) * 2.0 + 0.7).astype(dtype)
    g = rng.standard_normal(SHAPE).astype(dtype)
    return x, g


def _params(dtype):
    rng = np.random.default_rng(7)
    return (1.0 + 0.3 * rng.standard_normal(C)).astype(dtype), \
        (0.2 * rng.standard_normal(C)).astype(dtype)


def _net(bn):
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), bn(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 6, 3), bn(6), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 4),
    ).double()


try:
    import ml_dtypes  # noqa: F401  (bfloat16 tensors are handed over as its arrays)
    _BF16_CASES = [("bfloat16", torch.bfloat16, torch.bfloat16),
                   ("bfloat16_mixed", torch.bfloat16, torch.float32)]
except ImportError:
    _BF16_CASES = []
# (tag, input dtype, module dtype)
LOWP_CASES = [("float16", torch.float16, torch.float16)] + _BF16_CASES


def _ddp_data(step):
    rng = np.random.default_rng(500 + step)
    x = rng.standard_normal((DDP_BATCH, 3, 8, 8))
    t = rng.integers(0, 4, DDP_BATCH)
    return torch.from_numpy(x), torch.from_numpy(t)


def _log_stderr(rank, out_dir):
    """This rank's stderr into out_dir/rank{rank}.log, with faulthandler's stacks."""
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)


def _worker(rank, world_size, port, out_dir):
    """One rank: the layer test in float64 and float32, then DDP training."""
    _log_stderr(rank, out_dir)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    import cynorm.torch as ct

    sizes = _split(SHAPE[0], world_size)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    saved = {}
    for dtype in (np.float64, np.float32):
        tag = np.dtype(dtype).name
        w, b = _params(dtype)
        layer = ct.SyncBatchNorm(C, momentum=0.3).to(torch.float64 if dtype == np.float64
                                                    else torch.float32)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(b))
        for step in range(STEPS):
            x, g = _layer_data(dtype, step)
            xt = torch.from_numpy(x[lo:hi].copy()).requires_grad_()
            layer.zero_grad()
            y = layer(xt)
            (y * torch.from_numpy(g[lo:hi])).sum().backward()
            saved[f"{tag}_y{step}"] = y.detach().numpy()
            saved[f"{tag}_dx{step}"] = xt.grad.numpy()
            saved[f"{tag}_dw{step}"] = layer.weight.grad.numpy().copy()
            saved[f"{tag}_db{step}"] = layer.bias.grad.numpy().copy()
        saved[f"{tag}_rm"] = layer.running_mean.numpy().copy()
        saved[f"{tag}_rv"] = layer.running_var.numpy().copy()
        saved[f"{tag}_nbt"] = layer.num_batches_tracked.numpy().copy()

    # float16 and bfloat16 input: a module of that dtype, and a float32 module with
    # bfloat16 input (mixed precision); results saved widened to float32 (exactly)
    for tag, tdt, pdt in LOWP_CASES:
        layer = ct.SyncBatchNorm(C, momentum=0.3).to(pdt)
        w, b = _params(np.float64)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(b))
        for step in range(STEPS):
            x, g = (torch.from_numpy(a).to(tdt) for a in _layer_data(np.float64, step))
            xt = x[lo:hi].clone().requires_grad_()
            layer.zero_grad()
            y = layer(xt)
            # the input is handed over without a copy: the backward keeps xt itself
            saved[f"{tag}_nocopy{step}"] = np.array(
                y.grad_fn.saved_tensors[0].data_ptr() == xt.data_ptr())
            (y * g[lo:hi]).sum().backward()
            saved[f"{tag}_dtypes{step}"] = np.array(
                [str(y.dtype), str(xt.grad.dtype), str(layer.weight.grad.dtype)])
            saved[f"{tag}_y{step}"] = y.detach().float().numpy()
            saved[f"{tag}_dx{step}"] = xt.grad.float().numpy()
            saved[f"{tag}_dw{step}"] = layer.weight.grad.float().numpy()
            saved[f"{tag}_db{step}"] = layer.bias.grad.float().numpy()
        saved[f"{tag}_rm"] = layer.running_mean.float().numpy()
        saved[f"{tag}_rv"] = layer.running_var.float().numpy()

    # DDP: equal local batches, the loss averaged over each rank's batch
    model = ct.SyncBatchNorm.convert_sync_batchnorm(_net(torch.nn.BatchNorm2d))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    per = DDP_BATCH // world_size
    losses = []
    for step in range(DDP_STEPS):
        x, t = _ddp_data(step)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x[rank * per:(rank + 1) * per]),
                                                 t[rank * per:(rank + 1) * per])
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world_size)
    saved["ddp_losses"] = np.array(losses)
    saved["ddp_running_var"] = model[1].running_var.detach().numpy().copy()
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **saved)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what AddressSanitizer, LeakSanitizer and UBSan write before they abort a process
_SANITIZER_REPORTS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")


def _logs(out_dir, world_size):
    parts = []
    for r in range(world_size):
        path = out_dir / f"rank{r}.log"
        text = path.read_text(errors="replace") if path.exists() else "(no log)"
        parts.append(f"--- rank {r} stderr ---\n{text[-4000:]}")
    return "\n".join(parts)


def _start_group(world_size, out_dir, worker):
    ctx = mp.spawn(worker, args=(world_size, _free_port(), str(out_dir)),
                   nprocs=world_size, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world_size} SyncBatchNorm processes did not finish in "
                        f"{TIMEOUT_S} s\n{_logs(out_dir, world_size)}")


def _run_group(world_size, out_dir, worker=_worker, attempts=3):
    for attempt in range(1, attempts + 1):
        run_dir = out_dir / f"attempt{attempt}"
        run_dir.mkdir()
        try:
            _start_group(world_size, run_dir, worker)
        except mp.ProcessExitedException as e:
            logs = _logs(run_dir, world_size)
            if e.signal_name is None or attempt == attempts or any(
                    report in logs for report in _SANITIZER_REPORTS):
                pytest.fail(f"{e}\n{logs}")
            warnings.warn(f"{world_size} SyncBatchNorm processes, attempt {attempt}: {e}; "
                          f"started again\n{logs}")
            continue
        except mp.ProcessRaisedException as e:
            pytest.fail(f"{e}\n{_logs(run_dir, world_size)}")
        return [dict(np.load(run_dir / f"rank{r}.npz")) for r in range(world_size)]
    raise AssertionError("unreachable")


@pytest.fixture(scope="module", params=[2, 3], ids=["2proc", "3proc"])
def ranks(request, tmp_path_factory):
    world_size = request.param
    return world_size, _run_group(world_size, tmp_path_factory.mktemp(f"w{world_size}"))


def _reference(dtype):
    """torch.nn.BatchNorm2d in float64 on the whole batch, step by step."""
    w, b = _params(dtype)
    bn = torch.nn.BatchNorm2d(C, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(w.astype(np.float64)))
        bn.bias.copy_(torch.from_numpy(b.astype(np.float64)))
    steps = []
    for step in range(STEPS):
        x, g = _layer_data(dtype, step)
        xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
        bn.zero_grad()
        y = bn(xt)
        (y * torch.from_numpy(g.astype(np.float64))).sum().backward()
        steps.append((y.detach().numpy(), xt.grad.numpy(), bn.weight.grad.numpy().copy(),
                      bn.bias.grad.numpy().copy()))
    return steps, bn.running_mean.numpy(), bn.running_var.numpy()


TOL = {"float64": dict(rtol=1e-12, atol=1e-12), "float32": dict(rtol=2e-6, atol=2e-6)}


@pytest.mark.parametrize("tag", ["float64", "float32"])
def test_sync_batch_norm_matches_single_process_batch_norm(ranks, tag):
    world_size, res = ranks
    steps, rm, rv = _reference(np.dtype(tag))
    tol = TOL[tag]
    for step, (y, dx, dw, db) in enumerate(steps):
        got_y = np.concatenate([r[f"{tag}_y{step}"] for r in res])
        got_dx = np.concatenate([r[f"{tag}_dx{step}"] for r in res])
        assert got_y.dtype == np.dtype(tag) and got_dx.dtype == np.dtype(tag)
        np.testing.assert_allclose(got_y, y, **tol)
        np.testing.assert_allclose(got_dx, dx, **tol)
        # each rank holds its share of the parameter gradients; together the batch's
        np.testing.assert_allclose(sum(r[f"{tag}_dw{step}"].astype(np.float64)
                                       for r in res), dw, **tol)
        np.testing.assert_allclose(sum(r[f"{tag}_db{step}"].astype(np.float64)
                                       for r in res), db, **tol)
    for r in res:
        np.testing.assert_allclose(r[f"{tag}_rm"], rm, **tol)
        np.testing.assert_allclose(r[f"{tag}_rv"], rv, **tol)
        assert r[f"{tag}_nbt"] == STEPS


@pytest.mark.parametrize("tag,tdt,pdt", LOWP_CASES, ids=[c[0] for c in LOWP_CASES])
def test_16bit_sync_batch_norm_within_one_ulp_of_the_float64_batch(ranks, tag, tdt, pdt):
    """float16/bfloat16 input, without a copy: y and dx within 1 ulp of float64 on the
    widened global batch, parameter gradients and running statistics in the module's
    dtype to its rounding."""
    from lowp_reference import assert_within_one_ulp

    world_size, res = ranks
    np16 = np.float16 if tdt == torch.float16 else np.dtype(ml_dtypes.bfloat16)
    w, b = (torch.from_numpy(a).to(pdt).double().numpy() for a in _params(np.float64))
    ch = (1, -1, 1, 1)
    rm, rv = np.zeros(C), np.ones(C)
    peps = 2.0 ** -7 if pdt == torch.bfloat16 else (2.0 ** -10 if pdt == torch.float16
                                                    else 2.0 ** -23)
    for step in range(STEPS):
        x, g = (torch.from_numpy(a).to(tdt).double().numpy()
                for a in _layer_data(np.float64, step))
        y, mean, rstd, rm, rv = ref.batch_norm(x, rm, rv, w, b, training=True,
                                               momentum=0.3)
        dx, dw, db = ref.batch_norm_backward(g, x, mean, rstd, w)
        xhat = (x - mean.reshape(ch)) * rstd.reshape(ch)
        gw = np.abs(g) * w.reshape(ch)
        gmax = gw.max(axis=(0, 2, 3), keepdims=True)
        for r in res:
            assert r[f"{tag}_nocopy{step}"]
            assert list(r[f"{tag}_dtypes{step}"]) == [str(tdt), str(tdt), str(pdt)]
        got_y = np.concatenate([r[f"{tag}_y{step}"] for r in res]).astype(np16)
        got_dx = np.concatenate([r[f"{tag}_dx{step}"] for r in res]).astype(np16)
        assert_within_one_ulp(got_y, y, terms=np.abs(xhat * w.reshape(ch))
                              + np.abs(b).reshape(ch), what="y")
        assert_within_one_ulp(got_dx, dx, terms=rstd.reshape(ch) * (
            gw + gmax + np.abs(xhat) * gmax), what="dx")
        # each rank's share rounded to the module's dtype, summed here in float64
        for got, e, t in ((sum(r[f"{tag}_dw{step}"].astype(np.float64) for r in res), dw,
                           np.abs(g * xhat).sum((0, 2, 3))),
                          (sum(r[f"{tag}_db{step}"].astype(np.float64) for r in res), db,
                           np.abs(g).sum((0, 2, 3)))):
            assert np.all(np.abs(got - e) <= world_size * peps * t + 1e-6 * t)
    for r in res:
        np.testing.assert_allclose(r[f"{tag}_rm"], rm, rtol=2 * peps, atol=2 * peps)
        np.testing.assert_allclose(r[f"{tag}_rv"], rv, rtol=2 * peps)


def test_sync_batch_norm_running_stats_bitwise_identical_on_every_rank(ranks):
    world_size, res = ranks
    for tag in ("float64", "float32") + tuple(c[0] for c in LOWP_CASES):
        for key in ("rm", "rv"):
            for r in res[1:]:
                assert np.array_equal(r[f"{tag}_{key}"], res[0][f"{tag}_{key}"])
    for r in res[1:]:
        assert np.array_equal(r["ddp_running_var"], res[0]["ddp_running_var"])


def test_ddp_training_with_sync_batch_norm_matches_single_process(ranks):
    world_size, res = ranks
    model = _net(torch.nn.BatchNorm2d)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(DDP_STEPS):
        x, t = _ddp_data(step)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # it trains
    for r in res:
        np.testing.assert_allclose(r["ddp_losses"], losses, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res[0]["ddp_running_var"],
                               model[1].running_var.detach().numpy(), rtol=1e-10)


def test_sync_batch_norm_is_batch_norm_outside_a_process_group():
    import cynorm.torch as ct

    assert not (dist.is_available() and dist.is_initialized())
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((4, 3, 5)))
    ref = torch.nn.BatchNorm1d(3).double()
    layer = ct.SyncBatchNorm(3).double()
    xr, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    np.testing.assert_allclose(layer(xl).detach(), ref(xr).detach(), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(layer.running_var, ref.running_var, rtol=1e-12)
    layer(xl).sum().backward()
    ref(xr).sum().backward()
    np.testing.assert_allclose(xl.grad, xr.grad, atol=1e-12)
    layer.eval()
    ref.eval()
    np.testing.assert_allclose(layer(x).detach(), ref(x).detach(), rtol=1e-12, atol=1e-12)


def test_convert_sync_batchnorm_replaces_every_batch_norm_and_keeps_its_state():
    import cynorm.torch as ct

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                              torch.nn.Sequential(ct.BatchNorm1d(4, affine=False)),
                              torch.nn.SyncBatchNorm(4, momentum=None))
    net[1].running_mean.fill_(0.5)
    weight = net[1].weight
    out = ct.SyncBatchNorm.convert_sync_batchnorm(net, process_group="pg")
    bns = [out[1], out[2][0], out[3]]
    assert all(type(m) is ct.SyncBatchNorm for m in bns)
    assert out[1].weight is weight and float(out[1].running_mean[0]) == 0.5
    assert out[2][0].weight is None and out[3].momentum is None
    assert all(m.process_group == "pg" for m in bns)
    assert isinstance(out[0], torch.nn.Conv2d)


def test_sync_batch_norm_rejects_bad_input():
    import cynorm.torch as ct

    layer = ct.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="2D"):
        layer(torch.zeros(3))
    with pytest.raises(TypeError, match="input must be float32.*float64"):
        layer(torch.zeros((2, 3), dtype=torch.int64))


def _aborts_once(rank, world_size, port, out_dir):
    """A rank 1 that is killed by SIGABRT in the first attempt only."""
    _log_stderr(rank, out_dir)
    if rank == 1 and out_dir.endswith("attempt1"):
        os.abort()
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), rank=np.array(rank))


def _sanitizer_abort(rank, world_size, port, out_dir):
    """A rank 0 that aborts after writing what a sanitizer writes, in every attempt."""
    _log_stderr(rank, out_dir)
    if rank == 0:
        os.write(2, b"==1==ERROR: AddressSanitizer: heap-buffer-overflow\n")
        os.abort()
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), rank=np.array(rank))


def _raises(rank, world_size, port, out_dir):
    _log_stderr(rank, out_dir)
    print(f"rank {rank} was here", file=sys.stderr, flush=True)
    raise ValueError(f"rank {rank} failed")


def test_group_killed_by_a_signal_is_started_again_with_its_logs(tmp_path):
    with pytest.warns(UserWarning, match=r"(?s)attempt 1: .*SIGABRT.*rank 1 stderr.*"
                                         r"Fatal Python error: Aborted"):
        res = _run_group(2, tmp_path, worker=_aborts_once)
    assert [int(r["rank"]) for r in res] == [0, 1]


def test_group_killed_by_a_signal_every_time_fails(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)SIGABRT.*Fatal Python error"):
        _run_group(2, tmp_path, worker=_aborts_once, attempts=1)


def test_python_error_in_a_rank_is_not_retried(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)ValueError: rank \d failed.*"
                                                    r"rank \d was here"):
        _run_group(2, tmp_path, worker=_raises)
    assert not (tmp_path / "attempt2").exists()


def test_abort_with_a_sanitizer_report_is_not_retried(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"(?s)SIGABRT.*AddressSanitizer"):
        _run_group(2, tmp_path, worker=_sanitizer_abort)
    assert not (tmp_path / "attempt2").exists()
