"""Build cynorm's Cython kernels.

By default every kernel module is compiled once per instruction-set level into its own
subpackage (cynorm/_kernels/_baseline, _v3, _v4 on x86-64; _baseline elsewhere; the
levels are listed in cynorm/_kernels/_levels.py), and `import cynorm` picks the best
level the CPU supports. The API modules (_api, _validate) are built for the baseline.

Environment switches (all optional):
  CYNORM_ARCH   "native": one build of the kernels for this machine only (-march=native),
                or any other -march value for one build for that target. Unset (or
                "dispatch"): the per-level builds. Results are bitwise the same on every
                choice.
  CYNORM_DEBUG  "1": bounds checks on, -O1 -g, for the test suite under sanitizers.
  CYNORM_SANITIZE  e.g. "address,undefined": adds -fsanitize=... on compile and link.

Build hygiene: the objects of each configuration (these switches, CC, CFLAGS) go to
their own build/temp... directory and the generated C to build/cython/..., and a changed
configuration rebuilds every extension (build/cynorm-config.json is the stamp they
depend on), so no object or module built for another level or target is ever reused.
"""
import hashlib
import json
import os
import platform
import runpy
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# one extension per kernel family, plus the runtime helpers; each is compiled per level
MODULES = ["slab", "channel", "row", "columns", "runtime", "partial", "channels_last"]
# the argument checks and dispatch, compiled for the baseline only (see below)
API_MODULES = ["_validate", "_api"]

HERE = os.path.dirname(os.path.abspath(__file__))
LEVELS = runpy.run_path(os.path.join(HERE, "cynorm", "_kernels", "_levels.py"))
DEBUG = os.environ.get("CYNORM_DEBUG", "") == "1"
SANITIZE = os.environ.get("CYNORM_SANITIZE", "")
ARCH = os.environ.get("CYNORM_ARCH", "") or "dispatch"
if ARCH == "portable":  # the former name of the build that runs on any CPU
    ARCH = "dispatch"
MACHINE = platform.machine()

# What the compiled objects depend on besides their sources.
CONFIG = {
    "arch": ARCH, "debug": DEBUG, "sanitize": SANITIZE, "machine": MACHINE,
    "python": sysconfig.get_config_var("EXT_SUFFIX"), "numpy": np.__version__,
    "cc": os.environ.get("CC", ""), "cflags": os.environ.get("CFLAGS", ""),
    "ldflags": os.environ.get("LDFLAGS", ""),
}
CONFIG_TAG = hashlib.sha1(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()[:10]
CONFIG_STAMP = os.path.join("build", "cynorm-config.json")


def _write_config_stamp():
    """Rewrite the stamp every extension depends on when the configuration changed (its
    new mtime makes build_ext rebuild them all); leave it alone otherwise."""
    text = json.dumps(CONFIG, sort_keys=True, indent=1) + "\n"
    os.makedirs(os.path.dirname(CONFIG_STAMP), exist_ok=True)
    try:
        with open(CONFIG_STAMP) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    with open(CONFIG_STAMP, "w") as f:
        f.write(text)


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


def _levels():
    """(name, compiler flags) of the kernel builds this configuration makes."""
    if ARCH == "dispatch":
        return [(name, list(flags)) for name, flags, _, _ in LEVELS["levels_for"](MACHINE)]
    flags = ["-march=" + ARCH]
    if ARCH == "native":
        flags.append("-mprefer-vector-width=512")  # kept only where the compiler has it
    return [(LEVELS["SINGLE"], flags)]


def _level_of(ext):
    """The level of a kernel extension (cynorm._kernels._<level>.<module>), else None."""
    parts = ext.name.split(".")
    if len(parts) == 4 and parts[1] == "_kernels" and parts[2].startswith("_"):
        return parts[2][1:]
    return None


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        # each configuration compiles into its own directory
        self.build_temp = os.path.join(self.build_temp, "cynorm-" + CONFIG_TAG)

    def build_extensions(self):
        compile_args = ["-O1", "-g"] if DEBUG else ["-O3"]
        # no -ffast-math (NaN/Inf must propagate); no FMA contraction, so that every
        # instruction set gives the same bits
        compile_args += ["-ffp-contract=off", "-fno-math-errno"]
        # _lanes.h's static inline helpers take and return vectors by value; GCC's notes
        # on the ABI of vector arguments are moot for them
        compile_args.append("-Wno-psabi")
        link_args = []
        if not DEBUG and not SANITIZE and sys.platform.startswith("linux"):
            link_args.append("-s")  # no symbol tables or debug info in the modules
        if _compiler_accepts(self.compiler, ["-fopenmp"]):
            compile_args.append("-fopenmp")
            link_args.append("-fopenmp")
        else:
            warnings.warn("cynorm: the C compiler has no OpenMP; building a "
                          "single-threaded cynorm")
        if SANITIZE:
            compile_args += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"]
            link_args += [f"-fsanitize={SANITIZE}"]
        level_flags = {}
        for name, flags in _levels():
            if flags and not _compiler_accepts(self.compiler, flags[:1]):
                if name != "baseline":
                    warnings.warn(f"cynorm: the compiler rejects {flags[0]}; "
                                  f"the {name} kernels are not built")
                    continue
                warnings.warn(f"cynorm: the compiler rejects {flags[0]}; the baseline "
                              "kernels are built for its default target")
                flags = []
            level_flags[name] = flags[:1] + [
                f for f in flags[1:] if _compiler_accepts(self.compiler, flags[:1] + [f])]
        baseline = level_flags.get("baseline", [])
        built = []
        for ext in self.extensions:
            level = _level_of(ext)
            if level is None:
                flags = baseline
            elif level in level_flags:
                flags = level_flags[level]
                ext.define_macros = ext.define_macros + [
                    ("CYNORM_LEVEL", f'"{level}"'), ("CYNORM_FLAGS", f'"{" ".join(flags)}"')]
            else:
                continue
            ext.extra_compile_args = compile_args + flags + ext.extra_compile_args
            ext.extra_link_args = link_args + ext.extra_link_args
            built.append(ext)
        self.extensions = built
        levels = {_level_of(e) for e in built} - {None}
        # the modules of levels this configuration does not build must not be packaged
        # (build/lib is shared by all configurations) nor imported (an in-place build)
        _remove_other_levels(os.path.join(self.build_lib, "cynorm", "_kernels"), levels)
        if getattr(self, "editable_mode", False) or getattr(self, "_cynorm_inplace", False):
            _remove_other_levels(os.path.join(HERE, "cynorm", "_kernels"), levels)
        super().build_extensions()


def _remove_other_levels(kernels, levels):
    """Delete the compiled modules under kernels/_<level>/ of every level not in levels."""
    if not os.path.isdir(kernels):
        return
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for entry in os.listdir(kernels):
        path = os.path.join(kernels, entry)
        if entry.startswith("_") and entry[1:] not in levels and os.path.isdir(path):
            for f in os.listdir(path):
                if f.endswith(suffix):
                    os.remove(os.path.join(path, f))


KERNEL_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}
# The argument checks and dispatch run on every call; compiled as they are (plain Python
# semantics, default directives), they make a tiny call cost about a microsecond less.
API_DIRECTIVES = {"language_level": 3}


def _cythonize(extensions):
    """The extensions with their .pyx/.py sources translated to C, one directory per
    level under build/cython (Cython writes the module's full name into the C file, so
    each level needs its own)."""
    cython_dir = os.path.join("build", "cython-debug" if DEBUG else "cython")
    groups = {}
    for ext in extensions:
        groups.setdefault(_level_of(ext) or "api", []).append(ext)
    out = []
    for group, exts in groups.items():
        out += cythonize(exts, include_path=["."], build_dir=os.path.join(cython_dir, group),
                         compiler_directives=API_DIRECTIVES if group == "api"
                         else KERNEL_DIRECTIVES)
    return out


class CythonizingBuildExt(BuildExt):
    def run(self):
        # translated only when building (an sdist needs no Cython run)
        _write_config_stamp()
        self._cynorm_inplace = self.inplace  # setuptools clears it while building
        translated = {e.name: e for e in _cythonize(self.extensions)}
        for ext in self.extensions:  # keep setuptools' own bookkeeping on each extension
            ext.sources = translated[ext.name].sources
            ext.depends = sorted(set(ext.depends) | set(translated[ext.name].depends))
        super().run()


ext_modules = [
    Extension(
        f"cynorm._kernels._{level}.{name}",
        [f"cynorm/_kernels/{name}.pyx"],
        include_dirs=[np.get_include(), "cynorm/_kernels"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
        depends=[CONFIG_STAMP],
    )
    for level, _ in _levels() for name in MODULES
] + [Extension(f"cynorm.{name}", [f"cynorm/{name}.py"], depends=[CONFIG_STAMP])
     for name in API_MODULES] + [
    # cynorm.torch's per-call glue: wraps tensors' memory as arrays through NumPy's C API
    Extension("cynorm._torch_glue", ["cynorm/_torch_glue.pyx"],
              include_dirs=[np.get_include()],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
              depends=[CONFIG_STAMP]),
    # the output cache: a NumPy memory handler for large outputs (cynorm/_pool.h)
    Extension("cynorm._pool", ["cynorm/_pool.pyx"],
              include_dirs=[np.get_include(), "cynorm"],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
              depends=["cynorm/_pool.h", CONFIG_STAMP]),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CythonizingBuildExt})
