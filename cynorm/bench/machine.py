"""Facts about the machine the benchmark runs on: CPU, cores, cache, memory, and the copy
bandwidth that is the yardstick of every GB/s figure."""
import os
import platform

import numpy as np

from cynorm.bench.timing import thread_count, time_calls


def _parse_size(text):
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def llc_bytes():
    """Size of the level-3 cache as sysfs reports it for cpu0 (None if unknown)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            if entry.startswith("index"):
                with open(os.path.join(base, entry, "level")) as f:
                    if f.read().strip() != "3":
                        continue
                with open(os.path.join(base, entry, "size")) as f:
                    return _parse_size(f.read())
    except (OSError, ValueError):
        pass
    return None


def available_memory():
    """MemAvailable from /proc/meminfo in bytes (None if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def copy_array_bytes():
    """Bytes of each copy-bandwidth array: max(4 * LLC, 256 MiB), capped at 1 GiB and so
    that the two arrays together take at most 1/4 of the available memory."""
    llc = llc_bytes() or (32 << 20)
    nbytes = min(max(4 * llc, 256 << 20), 1 << 30)
    avail = available_memory()
    if avail is not None:
        nbytes = min(nbytes, avail // 8)
    return nbytes


def copy_bandwidth(thread_counts, nbytes, repeats):
    """GB/s of cynorm's parallel_copy (1 read + 1 write of each byte) per thread count."""
    from cynorm._kernels.runtime import parallel_copy
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    result = {}
    for n in thread_counts:
        with thread_count(n):
            t = time_calls({"copy": lambda: parallel_copy(src, dst)}, max(3, repeats))
        result[n] = 2 * nbytes / t["copy"] / 1e9
    return result



def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def all_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1

