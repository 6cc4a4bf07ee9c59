"""The output cache (cynorm/_pool.pyx): outputs of 16 MiB and more come from a NumPy
memory handler that keeps freed blocks for reuse. A reused block must never leak its old
values into a result, the cache must keep no more than its limit, arrays from it must
behave as any NumPy array (resize, free on another thread, fork), and a bad setting gets
a clear error."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import cynorm
from cynorm import _pool
import reference as ref

BIG = (2, 8, 512, 520)     # float32: 16.25 MiB, over the cache's threshold
SMALL = (2, 8, 16, 16)

try:
    from numpy._core.multiarray import get_handler_name
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import get_handler_name


@pytest.fixture
def cache():
    """The cache on with a 1 GiB limit and empty counters of blocks; restored after."""
    previous = cynorm.set_output_cache(0)
    cynorm.set_output_cache(1 << 30)
    yield
    cynorm.set_output_cache(previous)


def _data(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_threshold_is_above_the_test_shape():
    assert np.prod(BIG) * 4 >= _pool.MIN_BYTES > np.prod(SMALL) * 4


def test_large_outputs_come_from_the_cache_small_ones_do_not(cache):
    y = cynorm.group_norm(_data(BIG, 0), 4)
    assert get_handler_name(y) == "cynorm_output_cache"
    assert get_handler_name(cynorm.group_norm(_data(SMALL, 0), 4)) != "cynorm_output_cache"
    cynorm.set_output_cache(0)
    assert get_handler_name(cynorm.group_norm(_data(BIG, 0), 4)) != "cynorm_output_cache"


def test_a_freed_output_is_reused_and_its_old_values_never_show(cache):
    x1, x2 = _data(BIG, 1), _data(BIG, 2)
    y = cynorm.group_norm(x1, 4)
    y.fill(np.nan)                     # what the next output's block will hold
    del y
    info = cynorm.output_cache_info()
    assert info["blocks"] == 1 and info["cached"] >= np.prod(BIG) * 4
    y2, m, r = cynorm.group_norm(x2, 4, return_stats=True)
    after = cynorm.output_cache_info()
    assert after["hits"] == info["hits"] + 1 and after["maps"] == info["maps"]
    ref.assert_close(y2, ref.group_norm(x2.astype(np.float64), 4)[0], np.float32)
    # the backward's dx too (the forward's output block is still held by y2)
    dy = _data(BIG, 3)
    dx = cynorm.group_norm_backward(dy, x2, m, r, 4)[0]
    dx.fill(np.nan)
    del dx
    dx = cynorm.group_norm_backward(dy, x2, m, r, 4)[0]
    want = cynorm.group_norm_backward(dy, x2, m, r, 4, out=np.empty_like(x2))[0]
    assert np.array_equal(dx, want)


def test_every_large_output_kind_is_correct_from_a_dirty_block(cache):
    """Each API's output from a block last filled with NaN: the same bits as into a
    fresh out= array."""
    x, dy = _data(BIG, 4), _data(BIG, 5)
    rows = x.reshape(-1, 520)
    poison = [cynorm.layer_norm(rows, 520) for _ in range(3)]
    for p in poison:
        p.fill(np.nan)
    del poison, p
    for call, outs in [
            (lambda o: cynorm.layer_norm(rows, 520, out=o), 1),
            (lambda o: cynorm.rms_norm(rows, 520, out=o), 1),
            (lambda o: cynorm.instance_norm(x, out=o), 1),
            (lambda o: cynorm.batch_norm(x, training=True, out=o), 1),
            (lambda o: cynorm.group_norm(x, 2, activation="silu", out=o), 1)]:
        got = call(None)
        want = call(np.empty_like(got))
        assert np.array_equal(got, want)
        got.fill(np.nan)
        del got
    m, r = cynorm.layer_norm(rows, 520, return_stats=True)[1:]
    got = cynorm.layer_norm_backward(dy.reshape(rows.shape), rows, m, r, 520)[0]
    want = cynorm.layer_norm_backward(dy.reshape(rows.shape), rows, m, r, 520,
                                      out=np.empty_like(rows))[0]
    assert np.array_equal(got, want)


def test_the_cache_keeps_at_most_its_limit(cache):
    n = np.prod(BIG) * 4
    cynorm.set_output_cache(int(1.5 * n) + (4 << 20))   # room for one block, not two
    ys = [cynorm.group_norm(_data(BIG, s), 4) for s in range(3)]
    del ys
    info = cynorm.output_cache_info()
    assert info["blocks"] == 1 and info["cached"] <= info["limit"]
    cynorm.set_output_cache(0)                        # releases what it holds
    info = cynorm.output_cache_info()
    assert info["blocks"] == 0 and info["cached"] == 0


def test_the_limit_counts_output_sizes_so_an_output_of_the_limit_is_kept(cache):
    n = int(np.prod(BIG) * 4)        # its mapping is rounded up to 18 MiB
    for limit, kept in ((n, 1), (n - 1, 0)):
        cynorm.set_output_cache(0)
        cynorm.set_output_cache(limit)
        del_me = cynorm.group_norm(_data(BIG, 3), 4)
        assert get_handler_name(del_me) == "cynorm_output_cache"
        del del_me
        info = cynorm.output_cache_info()
        assert (info["blocks"], info["cached"]) == (kept, n * kept)


def test_resizing_an_output_keeps_its_values(cache):
    y = cynorm.group_norm(_data(BIG, 6), 4)
    want = y.copy()
    y.resize((BIG[0] * 2,) + BIG[1:], refcheck=False)   # the handler's realloc
    assert np.array_equal(y[:BIG[0]], want)
    y[BIG[0]:] = 1.0
    assert np.all(y[BIG[0]:] == 1.0)


def test_outputs_freed_on_other_threads(cache):
    """Arrays made here and dropped by several threads at once, while this thread
    allocates: the cache's list stays consistent (its counts add up)."""
    x = _data(BIG, 7)
    want = cynorm.group_norm(x, 4)
    errors = []

    def work():
        try:
            for _ in range(4):
                y = cynorm.group_norm(x, 4)
                if not np.array_equal(y, want):
                    errors.append("wrong result")
                del y
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors
    info = cynorm.output_cache_info()
    assert info["cached"] <= info["limit"] and info["blocks"] <= 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_uses_and_frees_cached_blocks(cache):
    ys = [cynorm.group_norm(_data(BIG, s), 4) for s in range(2)]
    del ys                                      # two idle blocks, inherited by the child
    x = _data(BIG, 8)
    want = cynorm.group_norm(x, 4)
    pid = os.fork()
    if pid == 0:                                # pragma: no cover - the child
        ok = all(np.array_equal(cynorm.group_norm(x, 4), want) for _ in range(3))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("bad,err", [(-1, ValueError), (1.5, TypeError), ("8", TypeError),
                                     (True, TypeError), (None, TypeError)])
def test_a_bad_limit_is_refused_naming_the_argument(bad, err):
    before = cynorm.output_cache_info()["limit"]
    with pytest.raises(err, match="max_bytes"):
        cynorm.set_output_cache(bad)
    assert cynorm.output_cache_info()["limit"] == before


def _import_with(value):
    env = dict(os.environ, CYNORM_OUTPUT_CACHE_MB=value)
    code = "import cynorm; print(cynorm.output_cache_info()['limit'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("value,limit", [("0", 0), ("64", 64 << 20), ("", 1024 << 20)])
def test_the_environment_sets_the_limit(value, limit):
    r = _import_with(value)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == limit


@pytest.mark.parametrize("value", ["lots", "-5", "1.5"])
def test_a_bad_environment_value_is_a_clear_error(value):
    r = _import_with(value)
    assert r.returncode != 0
    assert "CYNORM_OUTPUT_CACHE_MB" in r.stderr and "ValueError" in r.stderr


def test_show_config_reports_the_cache(cache, capsys):
    ys = [cynorm.group_norm(_data(BIG, 9), 4)]
    del ys
    cfg = cynorm.show_config("dicts")
    assert cfg["output cache"] == cynorm.output_cache_info()
    assert cfg["output cache"]["blocks"] == 1
    cynorm.show_config()
    assert "at most 1024 MiB idle" in capsys.readouterr().out
    cynorm.set_output_cache(0)
    cynorm.show_config()
    assert "output cache: off" in capsys.readouterr().out
