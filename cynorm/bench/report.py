"""Output: one table printer, the report's columns, the geometric-mean summary, the
progress bar and the JSON writer."""
import json
import math
import os
import sys

from cynorm.bench.anchors import LABELS
from cynorm.bench.suite import OPS, PASSES, TINY_CALL, Case, case_label


def print_table(rows, columns, file=None):
    """Print dict rows as an aligned text table. columns: (header, key or function of
    the row, format spec); a None value prints as '-'."""
    file = file or sys.stdout
    cells = []
    for row in rows:
        line = []
        for _, key, spec in columns:
            v = key(row) if callable(key) else row.get(key)
            line.append("-" if v is None else format(v, spec))
        cells.append(line)
    heads = [h for h, _, _ in columns]
    widths = [max([len(h)] + [len(line[j]) for line in cells]) for j, h in enumerate(heads)]
    left = [spec == "" for _, _, spec in columns]  # text columns align left

    def fmt(line):
        return "  ".join(c.ljust(wd) if lf else c.rjust(wd)
                         for c, wd, lf in zip(line, widths, left)).rstrip()

    print(fmt(heads), file=file)
    print("  ".join("-" * wd for wd in widths), file=file)
    for line in cells:
        print(fmt(line), file=file)


def _ms(key):
    return lambda r: None if r[key] is None else r[key] * 1e3



def _us(key):
    return lambda r: None if r[key] is None else r[key] * 1e6


MAIN_COLUMNS = [
    ("op", "op", ""),
    ("shape", lambda r: case_label(Case(r["op"], tuple(r["shape"]), r["groups"])), ""),
    ("dtype", "dtype", ""),
    ("thr", "threads", "d"),
    ("pass", "pass", ""),
    ("cynorm ms", _ms("cynorm_s"), ".3f"),
    ("out= ms", _ms("cynorm_out_s"), ".3f"),
    ("torch ms", _ms("torch_s"), ".3f"),
    ("numpy ms", _ms("numpy_s"), ".3f"),
    ("torch/cy", lambda r: None if r.get("unstable") else r["torch_over_cynorm"], ".2f"),
    ("GB/s", "gbps", ".1f"),
    ("% copy", "pct_copy", ".0f"),
    ("note", lambda r: r.get("unstable") or "", ""),
]

def _stable_ratio(key):
    return lambda r: None if r.get("unstable") else r.get(key)


def main_columns(anchor_keys=()):
    """MAIN_COLUMNS with one ratio column per optional anchor in the run (other's time /
    cynorm's, > 1: cynorm is faster), after torch's."""
    at = next(i for i, c in enumerate(MAIN_COLUMNS) if c[0] == "torch/cy") + 1
    extra = [(f"{LABELS[k]}/cy", _stable_ratio(f"{k}_over_cynorm"), ".2f")
             for k in anchor_keys]
    return MAIN_COLUMNS[:at] + extra + MAIN_COLUMNS[at:]


TINY_COLUMNS = [
    ("op", "op", ""),
    ("shape", lambda r: case_label(Case(r["op"], tuple(r["shape"]), r["groups"])), ""),
    ("dtype", "dtype", ""),
    ("thr", "threads", "d"),
    ("pass", "pass", ""),
    ("cynorm us", _us("cynorm_s"), ".1f"),
    ("out= us", _us("cynorm_out_s"), ".1f"),
    ("torch us", _us("torch_s"), ".1f"),
    ("torch/cy", "torch_over_cynorm", ".2f"),
]


BANDWIDTH_COLUMNS = [
    ("op", "op", ""),
    ("shape", lambda r: case_label(Case(r["op"], tuple(r["shape"]), r["groups"])), ""),
    ("thr", "threads", "d"),
    ("pass", "pass", ""),
    ("out= ms", _ms("cynorm_out_s"), ".1f"),
    ("GB/s", "gbps", ".1f"),
    ("% copy", "pct_copy", ".0f"),
]


def geomean_summary(rows, thread_counts, key="torch_over_cynorm"):
    """Per op and pass: geometric mean of a ratio (torch/cynorm by default; an anchor's
    `<key>_over_cynorm`) at each thread count, over the stable rows that have it."""
    out = []
    for op in OPS:
        for pass_ in PASSES:
            line = {"op": op, "pass": pass_}
            for n in thread_counts:
                r = [row[key] for row in rows
                     if row["op"] == op and row["pass"] == pass_ and row["threads"] == n
                     and row.get(key) and not row.get("unstable")]
                line[n] = math.exp(sum(map(math.log, r)) / len(r)) if r else None
            if any(line[n] is not None for n in thread_counts):
                out.append(line)
    return out


class Progress:
    """A progress bar on stderr, drawn only when stderr is a terminal: tqdm's when tqdm
    is installed (pip install cynorm[progress]), else a plain one-line bar."""

    def __init__(self, total, width=30):
        self.total, self.width, self.done = total, width, 0
        self.enabled = total > 0 and sys.stderr.isatty()
        self.bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, file=sys.stderr, leave=False,
                                dynamic_ncols=True, unit="case")

    def step(self, label):
        if not self.enabled:
            return
        if self.bar is not None:
            if self.done:
                self.bar.update(1)
            self.bar.set_description_str(label[:60], refresh=True)
            self.done += 1
            return
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label[:60]:<60}")
        sys.stderr.flush()
        self.done += 1

    def close(self):
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\r" + " " * (self.width + 80) + "\r")
            sys.stderr.flush()


def _write_json(path, doc):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)



def anchor_summaries(rows, threads, anchor_keys):
    """{anchor key: geomean_summary of its ratio} for the anchors with any ratio."""
    out = {}
    for k in anchor_keys:
        s = geomean_summary(rows, threads, f"{k}_over_cynorm")
        if s:
            out[k] = s
    return out


def print_report(rows, tiny_rows, summary, threads, anchor_keys=(), anchor_summary=None):
    print_table(rows, main_columns(anchor_keys))
    print("\nnumpy: plain NumPy in the input dtype, single-threaded, timed once per case. "
          "out= : cynorm writing into preallocated outputs.\nGB/s: bytes that must move "
          "(fwd: read x, write y; bwd: read dy and x, write dx) / cynorm time; "
          "% copy: of the copy bandwidth at the same thread count.\nnote: an unstable "
          "measurement (timing rounds more than 2x apart, or several threads over 5x "
          "slower than one: the machine was busy) shows no ratio and is left out of the "
          "summary; run again on a quieter machine.")
    if anchor_keys:
        print(", ".join(f"{LABELS[k]}/cy" for k in anchor_keys) + ": that library's "
              "time over cynorm's (allocating, as its users call it; ORT and OpenVINO "
              "inference only), checked first against the float64 reference; '-': not "
              "run for this row (see the notes).")
    for name, summ in [("torch", summary)] + [
            (LABELS[k], s) for k, s in (anchor_summary or {}).items()]:
        if summ:
            print(f"\ngeometric mean of {name}/cynorm (> 1: cynorm is faster)")
            print_table(summ, [("op", "op", ""), ("pass", "pass", "")]
                        + [(f"{n} thr", n, ".2f") for n in threads])
    if tiny_rows:
        print(f"\nper-call overhead: {TINY_CALL.op} {case_label(TINY_CALL)} float32, "
              "microseconds per call")
        print_table(tiny_rows, TINY_COLUMNS)

