"""Bitwise A/B of two cynorm builds on the outputs that may be stored past the caches.

    python benchmarks/ab_stream_stores.py dump OUT.json   (run with PYTHONPATH=<tree>)
    python benchmarks/ab_stream_stores.py compare A.json B.json

dump writes a CRC32 of every output of every case (float32: each op forward and
backward, with and without weight/bias, every activation where the API has one, shapes
just under and over the 32 MiB streaming threshold with odd and even run lengths, arrays
at 64-byte-aligned and misaligned offsets); run it under each OMP_NUM_THREADS and
CYNORM_ISA for each tree, then compare the pairs: every case must be bitwise equal.
"""

import json
import sys
import zlib

import numpy as np

ACTS = (None, "silu", "gelu", "gelu_tanh", "relu")
MIB32 = (32 << 20) // 4  # float32 elements at the threshold


def at_offset(shape, offset, rng):
    """A float32 array of shape whose data start offset elements past 64-byte alignment."""
    n = int(np.prod(shape))
    buf = np.empty(n + 32, dtype=np.float32)
    start = (-(buf.ctypes.data // 4)) % 16 + offset
    a = buf[start:start + n].reshape(shape)
    a[...] = rng.standard_normal(shape, dtype=np.float32) * 3 + 1
    return a


def out_like(x, offset):
    n = x.size
    buf = np.empty(n + 32, dtype=np.float32)
    start = (-(buf.ctypes.data // 4)) % 16 + offset
    return buf[start:start + n].reshape(x.shape)


def crc(a):
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1))


def cases():
    import cynorm

    rng = np.random.default_rng(7)
    # (N, C, HW): over the threshold with odd runs, exactly at it (even runs), under it
    slab_shapes = [(2, 64, 66049), (2, 64, 65536), (2, 64, 65025), (3, 8, 1)]
    row_shapes = [(8193, 1025), (8192, 1024), (8191, 1024), (5, 7)]
    for shape in slab_shapes:
        N, C, HW = shape
        big = N * C * HW >= MIB32
        for off in (0, 1) if big else (0,):
            x = at_offset(shape, off, rng)
            dy = at_offset(shape, (off + 3) % 16, rng)
            for wb in (False, True):
                w = rng.standard_normal(C).astype(np.float32) if wb else None
                b = rng.standard_normal(C).astype(np.float32) if wb else None
                for act in ACTS if (big or shape[2] == 1) else (None, "silu"):
                    tag = f"{shape} off{off} wb{wb} {act}"
                    for name, G in (("group_norm", 8), ("instance_norm", None)):
                        y = out_like(x, off)
                        if G is not None:
                            _, m, r = cynorm.group_norm(x, G, w, b, out=y, return_stats=True,
                                                        activation=act)
                            dx = out_like(x, (off + 5) % 16)
                            cynorm.group_norm_backward(dy, x, m, r, G, w, out=dx, bias=b,
                                                       activation=act)
                        else:
                            _, m, r = cynorm.instance_norm(x, weight=w, bias=b, out=y,
                                                           return_stats=True,
                                                           activation=act)
                            dx = out_like(x, (off + 5) % 16)
                            cynorm.instance_norm_backward(dy, x, m, r, w, out=dx, bias=b,
                                                          activation=act)
                        yield f"{name} {tag} y", crc(y)
                        yield f"{name} {tag} dx", crc(dx)
                    for training in (True, False):
                        y = out_like(x, off)
                        rm = np.zeros(C, np.float32)
                        rv = np.ones(C, np.float32)
                        cynorm.batch_norm(x, rm, rv, w, b, training=training, out=y,
                                          activation=act)
                        yield f"batch_norm train{training} {tag} y", crc(y)
                    if act is None:
                        _, m, r = cynorm.batch_norm(x, None, None, w, b, training=True,
                                                    return_stats=True)
                        dx = out_like(x, off)
                        cynorm.batch_norm_backward(dy, x, m, r, w, out=dx, bias=b)
                        yield f"batch_norm {tag} dx", crc(dx)
    for shape in row_shapes:
        R, K = shape
        big = R * K >= MIB32
        for off in (0, 3) if big else (0,):
            x = at_offset(shape, off, rng)
            dy = at_offset(shape, (off + 7) % 16, rng)
            res = at_offset(shape, (off + 2) % 16, rng)
            for wb in (False, True, "w"):
                w = rng.standard_normal(K).astype(np.float32) if wb else None
                b = rng.standard_normal(K).astype(np.float32) if wb is True else None
                tag = f"{shape} off{off} wb{wb}"
                y = out_like(x, off)
                _, m, r = cynorm.layer_norm(x, K, w, b, out=y, return_stats=True)
                yield f"layer_norm {tag} y", crc(y)
                dx = out_like(x, off)
                cynorm.layer_norm_backward(dy, x, m, r, K, w, out=dx)
                yield f"layer_norm {tag} dx", crc(dx)
                y = out_like(x, off)
                _, r = cynorm.rms_norm(x, K, w, out=y, return_stats=True)
                yield f"rms_norm {tag} y", crc(y)
                dx = out_like(x, off)
                cynorm.rms_norm_backward(dy, x, r, K, w, out=dx)
                yield f"rms_norm {tag} dx", crc(dx)
                if wb is True:
                    y = out_like(x, off)
                    ro = out_like(x, (off + 1) % 16)
                    cynorm.layer_norm(x, K, w, b, out=y, residual=res, residual_out=ro)
                    yield f"layer_norm residual {tag} y", crc(y)
                    yield f"layer_norm residual {tag} h", crc(ro)


def main():
    if sys.argv[1] == "dump":
        out = dict(cases())
        with open(sys.argv[2], "w") as f:
            json.dump(out, f, indent=0)
        print(len(out), "cases")
        return
    a = json.load(open(sys.argv[2]))
    b = json.load(open(sys.argv[3]))
    assert a.keys() == b.keys(), "different case lists"
    bad = [k for k in a if a[k] != b[k]]
    for k in bad:
        print("DIFFERS:", k)
    print(f"{len(a) - len(bad)} of {len(a)} cases bitwise equal")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
