"""cynorm.show_config(): which build of the kernels runs, and why."""
import os
import platform
import sys
from typing import Any, Dict, Literal, Optional, overload

import numpy as np

import cynorm
import cynorm._kernels as kernels
from cynorm import _pool


def _config() -> Dict[str, Any]:
    info = kernels.runtime.build_info()
    return {
        "cynorm": cynorm.__version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "kernels": {
            "level": kernels.LEVEL,
            "reason": kernels.REASON,
            "compiler flags": info["flags"] or "(the compiler's default target)",
            "widest vector instructions": info["isa"],
            "path": os.path.dirname(kernels.runtime.__file__),
        },
        "levels built": list(kernels.BUILT_LEVELS) or ["single"],
        "levels this CPU supports": list(kernels.CPU_LEVELS),
        "CYNORM_ISA": os.environ.get("CYNORM_ISA") or None,
        "openmp": bool(kernels.runtime.openmp_enabled()),
        "threads": int(kernels.runtime.get_num_threads()),
        "output cache": _pool.output_cache_info(),
    }


@overload
def show_config(mode: Literal["stdout"] = ...) -> None: ...
@overload
def show_config(mode: Literal["dicts"]) -> Dict[str, Any]: ...


def show_config(mode: str = "stdout") -> Optional[Dict[str, Any]]:
    """Print (mode="stdout") or return (mode="dicts") how this cynorm was built and which
    kernels run: the instruction-set level chosen at import and why (the best level the
    CPU supports, or CYNORM_ISA), the levels built, OpenMP and the thread count, and the
    output cache's state."""
    if mode not in ("stdout", "dicts"):
        raise ValueError(f"mode must be 'stdout' or 'dicts', got {mode!r}")
    cfg = _config()
    if mode == "dicts":
        return cfg
    k = cfg["kernels"]
    print(f"cynorm {cfg['cynorm']} (Python {cfg['python']}, NumPy {cfg['numpy']}, "
          f"{cfg['machine']})")
    print(f"kernels: {k['level']}, {k['reason']}")
    print(f"  compiled with: {k['compiler flags']} (widest vectors: "
          f"{k['widest vector instructions']})")
    print(f"  from: {k['path']}")
    print(f"levels built: {', '.join(cfg['levels built'])}; this CPU supports: "
          f"{', '.join(cfg['levels this CPU supports'])}")
    print(f"CYNORM_ISA: {cfg['CYNORM_ISA'] or 'not set (automatic choice)'}")
    print(f"OpenMP: {'yes' if cfg['openmp'] else 'no (single-threaded build)'}; "
          f"threads: {cfg['threads']}")
    c = cfg["output cache"]
    if c["limit"]:
        print(f"output cache: outputs of {_pool.MIN_BYTES >> 20} MiB and more reuse freed "
              f"memory, at most {c['limit'] / 2**20:g} MiB idle; holding "
              f"{c['cached'] / 2**20:g} MiB in {c['blocks']} blocks")
    else:
        print("output cache: off (CYNORM_OUTPUT_CACHE_MB=0 or set_output_cache(0))")
    return None
