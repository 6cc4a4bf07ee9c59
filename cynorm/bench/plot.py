"""The chart written by `python -m cynorm bench --plot`: cynorm and torch side by side."""
import json

from cynorm.bench.suite import PASSES, Case, case_label

# the PNG text chunk that carries the drawn series (read back by the tests)
SERIES_KEY = "cynorm-bench-series"


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _label(r):
    return (f"{r['op']} {case_label(Case(r['op'], tuple(r['shape']), r['groups']))} "
            f"{r['dtype']} {r['threads']}t")


def _gbps(r, key):
    """GB/s of one library's time in a row (None when it was not timed or is unstable)."""
    t = r.get(key)
    return None if not t or r.get("unstable") else r["bytes"] / t / 1e9


def write_plot(path, rows, copy_bw):
    """A PNG with one panel per pass: for every case a pair of horizontal bars, cynorm's
    and torch's achieved GB/s (bytes that must move / time), labelled with torch/cynorm
    (> 1: cynorm is faster), and the copy bandwidth of each thread count as a dashed
    line. Returns the series as drawn, read back from the bars ({pass: {"labels",
    "cynorm_gbps", "torch_gbps", "copy_gbps"}}), also stored in the PNG's text chunk
    SERIES_KEY; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n_cases = max([sum(r["pass"] == p for r in rows) for p in PASSES] + [1])
    fig, axes = plt.subplots(1, len(PASSES), figsize=(15, 1.2 + 0.42 * n_cases),
                             sharey=True, squeeze=False)
    threads = sorted({r["threads"] for r in rows})
    series = {}
    for ax, pass_ in zip(axes[0], PASSES):
        sel = [r for r in rows if r["pass"] == pass_]
        labels = [_label(r) for r in sel]
        pos = list(range(len(sel)))[::-1]  # first case on top
        h = 0.38
        cy = [_gbps(r, "cynorm_s") or 0.0 for r in sel]
        th = [_gbps(r, "torch_s") or 0.0 for r in sel]
        bars_cy = ax.barh([p + h / 2 for p in pos], cy, h, color="C0", label="cynorm")
        bars_th = ax.barh([p - h / 2 for p in pos], th, h, color="C1", label="torch")
        for p, r, c in zip(pos, sel, cy):
            ratio = r.get("torch_over_cynorm")
            note = ("unstable" if r.get("unstable")
                    else f"x{ratio:.2f}" if ratio else "")
            if note:
                ax.annotate(note, xy=(c, p + h / 2), xytext=(3, 0),
                            textcoords="offset points", va="center", fontsize=7)
        copy_drawn = {}
        for i, n in enumerate(threads):
            if n in copy_bw:
                line = ax.axvline(copy_bw[n], color="0.35", linewidth=1,
                                  linestyle=("--", ":", "-.")[i % 3],
                                  label=f"copy bandwidth, {n} thread{'s' * (n > 1)}: "
                                        f"{copy_bw[n]:.1f} GB/s")
                copy_drawn[str(n)] = float(line.get_xdata()[0])
        ax.set_yticks(pos)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlabel("achieved GB/s (bytes that must move / time; higher is better)")
        ax.set_title(f"{pass_}: cynorm vs torch (label: torch time / cynorm time)",
                     fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        # what the bars show, read back from them (0 where a library has no time)
        series[pass_] = {
            "labels": labels,
            "cynorm_gbps": [float(b.get_width()) for b in bars_cy],
            "torch_gbps": [float(b.get_width()) for b in bars_th],
            "copy_gbps": copy_drawn,
        }
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={SERIES_KEY: json.dumps(series)})
    plt.close(fig)
    return series


def read_plot_series(path):
    """The series stored in a PNG written by write_plot."""
    from PIL import Image
    with Image.open(path) as im:
        return json.loads(im.text[SERIES_KEY])
