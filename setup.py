"""Build cynorm's Cython kernels.

Environment switches (all optional):
  CYNORM_ARCH   instruction set: "native" (default: this machine's, e.g. AVX-512 or AVX2),
                "portable" (the compiler's baseline, x86-64 SSE2 / armv8), or any -march
                value such as "x86-64-v3". Results are bitwise the same on every choice.
  CYNORM_DEBUG  "1": bounds checks on, -O1 -g, for the test suite under sanitizers.
  CYNORM_SANITIZE  e.g. "address,undefined": adds -fsanitize=... on compile and link.
"""
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# one extension per kernel family, plus the runtime helpers and the scale-out steps
MODULES = ["slab", "channel", "row", "runtime", "partial"]
DEBUG = os.environ.get("CYNORM_DEBUG", "") == "1"
SANITIZE = os.environ.get("CYNORM_SANITIZE", "")
ARCH = os.environ.get("CYNORM_ARCH", "native")


def _compiler_accepts(compiler, flags):
    """Whether the build's C compiler compiles and links a tiny OpenMP-using file with flags."""
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n"
    if not any("openmp" in f for f in flags):
        src = "int main(void){return 0;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(src)
        cc = compiler.compiler_so[0] if hasattr(compiler, "compiler_so") else "cc"
        cmd = [cc, path, "-o", os.path.join(tmp, "probe")] + flags
        return subprocess.run(cmd, capture_output=True).returncode == 0


class BuildExt(build_ext):
    def build_extensions(self):
        compile_args = ["-O1", "-g"] if DEBUG else ["-O3"]
        # no -ffast-math (NaN/Inf must propagate); no FMA contraction, so that every
        # instruction set gives the same bits
        compile_args += ["-ffp-contract=off", "-fno-math-errno"]
        link_args = []
        if ARCH != "portable":
            flag = "-march=" + ARCH
            if _compiler_accepts(self.compiler, [flag]):
                compile_args.append(flag)
                if _compiler_accepts(self.compiler, [flag, "-mprefer-vector-width=512"]):
                    compile_args.append("-mprefer-vector-width=512")
            else:
                warnings.warn(f"cynorm: compiler rejects {flag}; building for its baseline")
        if _compiler_accepts(self.compiler, ["-fopenmp"]):
            compile_args.append("-fopenmp")
            link_args.append("-fopenmp")
        else:
            warnings.warn("cynorm: the C compiler has no OpenMP; building a "
                          "single-threaded cynorm")
        if SANITIZE:
            compile_args += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"]
            link_args += [f"-fsanitize={SANITIZE}"]
        for ext in self.extensions:
            ext.extra_compile_args = compile_args + ext.extra_compile_args
            ext.extra_link_args = link_args + ext.extra_link_args
        super().build_extensions()


directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}

extensions = [
    Extension(
        f"cynorm._kernels.{name}",
        [f"cynorm/_kernels/{name}.pyx"],
        include_dirs=[np.get_include(), "cynorm/_kernels"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
    )
    for name in MODULES
]

# The argument checks and dispatch run on every call; compiled as they are (plain Python
# semantics, default directives), they make a tiny call cost about a microsecond less.
api_modules = [Extension(f"cynorm.{name}", [f"cynorm/{name}.py"])
               for name in ("_validate", "_api")]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives,
                          include_path=["."])
    + cythonize(api_modules, compiler_directives={"language_level": 3}),
    cmdclass={"build_ext": BuildExt},
)
