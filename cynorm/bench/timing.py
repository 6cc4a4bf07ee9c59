"""The one timing helper (medians of interleaved rounds after a warm-up) and the thread
count context shared by cynorm and torch."""
import gc
import statistics
import time


def _clock(fn, loops):
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return time.perf_counter() - t0


# GNU OpenMP workers spin-wait for many milliseconds after a parallel region before they
# sleep; torch bundles its own runtime, so right after a torch call its workers would
# compete for the cores with cynorm's (and the other way round).
WARM_SECONDS = 0.05


def _warm(fn):
    """Call fn for WARM_SECONDS (at least once): the other library's workers fall asleep
    and this one's are awake."""
    end = time.perf_counter() + WARM_SECONDS
    fn()
    while time.perf_counter() < end:
        fn()


def time_calls(fns, repeats, min_sample=2e-3, budget=10.0, rounds=3, spreads=None):
    """Median seconds per call of each function in the dict `fns`.

    Calls too short to time alone are looped so that one sample lasts about
    `min_sample`. The functions take turns in `rounds` rounds, each taking its share of
    the `repeats` samples back to back after a warm-up (_warm), so that the noise of a
    shared machine hits all of them alike while neither library's OpenMP workers, still
    spinning after its own calls, steal the cores from the other's samples. A function
    so slow that `repeats` samples would take over `budget` seconds gets fewer (>= 3).
    spreads: a dict to fill with each function's spread between rounds, the slowest
    round's median over the fastest's (1.0 for one round).
    """
    loops, counts = {}, {}
    for name, fn in fns.items():
        t = _clock(fn, 1)
        if t < min_sample:
            t = _clock(fn, 1)  # the first call also paid for page faults
        loops[name] = max(1, min(100_000, int(min_sample / max(t, 1e-8))))
        counts[name] = min(repeats, max(3, int(budget / max(t, 1e-8))))
    samples = {name: [] for name in fns}
    by_round = {name: [] for name in fns}
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name, fn in fns.items():
                share = -(-counts[name] // rounds)  # ceil
                todo = min(share, counts[name] - len(samples[name]))
                if todo <= 0:
                    continue
                _warm(fn)
                got = [_clock(fn, loops[name]) / loops[name] for _ in range(todo)]
                samples[name] += got
                by_round[name].append(statistics.median(got))
    finally:
        if was_enabled:
            gc.enable()
    if spreads is not None:
        for name, meds in by_round.items():
            spreads[name] = max(meds) / min(meds) if min(meds) > 0 else float("inf")
    return {name: statistics.median(s) for name, s in samples.items()}


class thread_count:
    """Context: n OpenMP threads for cynorm (threadpoolctl) and for torch."""

    def __init__(self, n, torch=None):
        self.n, self.torch = n, torch

    def __enter__(self):
        from threadpoolctl import threadpool_limits
        self.limits = threadpool_limits(self.n, user_api="openmp")
        if self.torch is not None:
            self.torch_before = self.torch.get_num_threads()
            self.torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.torch is not None:
            self.torch.set_num_threads(self.torch_before)
        self.limits.restore_original_limits()

