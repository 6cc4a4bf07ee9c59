"""The chart written by `python -m cynorm bench --plot`."""
from cynorm.bench.suite import OPS, PASSES


def write_plot(path, rows, copy_bw):
    """Roofline-style PNG: achieved GB/s of each case against the bytes it moves, with the
    copy bandwidth of each thread count as a horizontal line. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(PASSES), figsize=(13, 5), sharey=True, squeeze=False)
    threads = sorted({r["threads"] for r in rows})
    colors = {n: f"C{i}" for i, n in enumerate(threads)}
    markers = dict(zip(OPS, "osD^v"))
    for ax, pass_ in zip(axes[0], PASSES):
        for n in threads:
            for op in OPS:
                sel = [r for r in rows if r["pass"] == pass_ and r["threads"] == n
                       and r["op"] == op]
                if not sel:
                    continue
                ax.scatter([r["bytes"] for r in sel], [r["gbps"] for r in sel],
                           color=colors[n], marker=markers[op],
                           label=f"{op}, {n} thr", alpha=0.8)
            if n in copy_bw:
                ax.axhline(copy_bw[n], color=colors[n], linestyle="--", linewidth=1)
                ax.annotate(f"copy, {n} thr: {copy_bw[n]:.1f} GB/s",
                            xy=(0.01, copy_bw[n]), xycoords=("axes fraction", "data"),
                            va="bottom", fontsize=8, color=colors[n])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes moved per call")
        ax.set_title(f"cynorm, {pass_}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("achieved GB/s")
    axes[0][-1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

