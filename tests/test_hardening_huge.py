"""Arrays of more than 2**31 elements: every index and offset must be 64-bit.

In-place (out=x) normalisation of a float32 array just over 2**31 elements (8.6 GB), with
the last normalisation set straddling element 2**31, checked against float64 statistics
of sampled sets and copies of windows of them (around element 2**31 among others), all
taken before the call. One slab-family test
(group_norm) and one row-family test (layer_norm, 2**21 + 3 rows).

These run in the default suite (CI has 24 GiB) and skip themselves when the machine has
less than 1.5x the array's size available, when CYNORM_SKIP_HUGE=1, or under the
sanitizer build (CYNORM_SANITIZED=1). Data is filled by tiling a small random block, not by
a random generator over 2**31 elements, to keep them fast.
"""
import gc
import os

import numpy as np
import pytest

import cynorm

CHUNK = 1 << 18  # elements per float64 chunk in the reference computations (cache-sized)


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _skip_unless_room(nbytes):
    if os.environ.get("CYNORM_SKIP_HUGE") == "1":
        pytest.skip("CYNORM_SKIP_HUGE=1")
    if os.environ.get("CYNORM_SANITIZED") == "1":
        pytest.skip("huge arrays under AddressSanitizer: too slow and too much shadow memory")
    avail = _available_bytes()
    if avail < 1.5 * nbytes:
        pytest.skip(f"needs {1.5 * nbytes / 2**30:.1f} GiB available, "
                    f"have {avail / 2**30:.1f} GiB")


def _stats64(a, eps):
    """mean and rstd of a float32 array in float64, in one pass over chunks of shifted
    values (the shift, the first element, keeps the sum of squares from cancelling)."""
    flat = a.reshape(-1)
    n = flat.size
    shift = float(flat[0])
    s = q = 0.0
    for i in range(0, n, CHUNK):
        d = flat[i:i + CHUNK].astype(np.float64)
        d -= shift
        s += d.sum()
        d *= d                             # (not np.dot: BLAS threads cost more here)
        q += d.sum()
    m = s / n
    return shift + m, 1.0 / np.sqrt(q / n - m * m + eps)


def _check_chunked(name, y, x_before, mean, rstd, w, b, tol=3e-6):
    """y (float32) == (x_before - mean) * rstd * w + b, elementwise, in chunks."""
    yf, xf = y.reshape(-1), x_before.reshape(-1)
    for i in range(0, xf.size, CHUNK):
        ref = (xf[i:i + CHUNK].astype(np.float64) - mean) * (rstd * w) + b
        err = np.abs(yf[i:i + CHUNK] - ref)
        bound = tol * (np.abs(ref) + 1.0)
        if not (err <= bound).all():
            k = int(np.argmax(err > bound))
            raise AssertionError(f"{name}: element {i + k}: got {yf[i + k]!r}, "
                                 f"reference {ref[k]!r}")


HUGE_ELEMENTS = 2**31 + 3072


@pytest.fixture(scope="module")
def huge_buffer():
    """One 8.6 GB float32 buffer shared by the tests of this module: touching fresh
    memory is most of their cost."""
    _skip_unless_room(HUGE_ELEMENTS * 4)
    buf = np.empty(HUGE_ELEMENTS, dtype=np.float32)
    yield buf
    del buf
    gc.collect()


def test_group_norm_in_place_on_more_than_2_31_elements(huge_buffer):
    N, C, L, G = 2, 8, 2**27 + 8, 4           # 2**31 + 128 elements, 8.6 GB
    cpg = C // G
    rng = np.random.default_rng(0)
    tile = rng.standard_normal(2**20).astype(np.float32)
    w = (1.0 + rng.random(C)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    x = huge_buffer[:N * C * L].reshape(N, C, L)
    try:
        # each channel its own offset and scale, so that mixing up sets shows
        full = (L // tile.size) * tile.size
        for n in range(N):
            for c in range(C):
                off, sc = np.float32(10 * (n * C + c) - 70), np.float32(0.5 + 0.25 * c)
                row = x[n, c]
                row[:full].reshape(-1, tile.size)[...] = tile * sc + off
                row[full:] = tile[:L - full] * sc + off
        assert x.size > 2**31
        # sampled sets: the first, and the last one, which straddles element 2**31. Their
        # float64 statistics, and copies of windows of each of their channels (start,
        # middle, end, and around element 2**31), are taken before the in-place call.
        sampled = [(0, 0), (N - 1, G - 1)]
        starts = {s: (s[0] * C + s[1] * cpg) * L for s in sampled}
        assert starts[sampled[-1]] < 2**31 < starts[sampled[-1]] + cpg * L
        ref_stats = {s: _stats64(x[s[0], s[1] * cpg:(s[1] + 1) * cpg], 1e-5)
                     for s in sampled}
        win = 1 << 20
        windows = {}
        for (n, g) in sampled:
            for j in range(cpg):
                c = g * cpg + j
                first = (n * C + c) * L        # flat index of x[n, c, 0]
                lo = [0, L // 2, L - win]
                if first < 2**31 < first + L:
                    lo.append(2**31 - first - win // 2)
                for a in lo:
                    windows[(n, c, a)] = x[n, c, a:a + win].copy()
        assert any(k[0] == N - 1 and (N - 1) * C * L + k[1] * L + k[2] < 2**31
                   < (N - 1) * C * L + k[1] * L + k[2] + win for k in windows)

        y, mean, rstd = cynorm.group_norm(x, G, w, b, out=x, return_stats=True)
        assert y is x
        for (n, g), (m_ref, r_ref) in ref_stats.items():
            assert abs(mean[n, g] - m_ref) <= 1e-9 * (abs(m_ref) + 10), (n, g, mean[n, g], m_ref)
            assert abs(rstd[n, g] - r_ref) <= 1e-9 * r_ref, (n, g, rstd[n, g], r_ref)
        for (n, c, a), before in windows.items():
            m_ref, r_ref = ref_stats[(n, c // cpg)]
            _check_chunked(f"group_norm x[{n}, {c}, {a}:{a + win}]", y[n, c, a:a + win],
                           before, m_ref, r_ref, float(w[c]), float(b[c]))
        # every set was normalised: a strided sample of its xhat has mean ~ 0, finite
        assert np.isfinite(mean).all() and np.isfinite(rstd).all()
        xhat = (y[:, :, ::4099].astype(np.float64) - b[:, None]) / w[:, None]
        set_means = xhat.reshape(N, G, -1).mean(axis=2)
        np.testing.assert_allclose(set_means, 0.0, atol=0.05)
    finally:
        del x


def test_layer_norm_in_place_on_more_than_2_31_elements(huge_buffer):
    K = 1024
    R = 2**21 + 3                              # 2**31 + 3072 elements, 8.6 GB
    rng = np.random.default_rng(1)
    B = 4099                                   # rows in the tile
    tile = rng.standard_normal((B, K)).astype(np.float32)
    w = (1.0 + rng.random(K)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    x = huge_buffer[:R * K].reshape(R, K)
    try:
        for k, r0 in enumerate(range(0, R, B)):
            r1 = min(r0 + B, R)
            np.add(tile[:r1 - r0], np.float32(k % 101 - 50), out=x[r0:r1])
        assert x.size > 2**31
        boundary = 2**31 // K                  # the first row past element 2**31
        rows = [0, 1, B, boundary - 2, boundary - 1, boundary, boundary + 1, R - 2, R - 1]
        before = x[rows].astype(np.float64)

        y, mean, rstd = cynorm.layer_norm(x, K, w, b, out=x, return_stats=True)
        assert y is x
        m_ref = before.mean(axis=1)
        r_ref = 1.0 / np.sqrt(((before - m_ref[:, None]) ** 2).mean(axis=1) + 1e-5)
        np.testing.assert_allclose(mean[rows], m_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rstd[rows], r_ref, rtol=1e-10)
        y_ref = (before - m_ref[:, None]) * r_ref[:, None] * w + b
        np.testing.assert_allclose(y[rows], y_ref, rtol=3e-6, atol=3e-6)
        # all rows normalised: a strided sample of rows has mean ~ mean(b)
        smp = y[::997].astype(np.float64)
        np.testing.assert_allclose(((smp - b) / w).mean(axis=1), 0.0, atol=1e-4)
    finally:
        del x
