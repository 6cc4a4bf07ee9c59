"""The instruction-set levels the kernels are compiled for, in one place: setup.py reads
this file (without importing cynorm) for the compiler flags, and the selector in
cynorm/_kernels/__init__.py for the CPU features each level needs.

Each level's build of every kernel module lives in its own subpackage,
cynorm/_kernels/_<level>/; the API modules (cynorm._api, cynorm._validate) are built for
the baseline only. On x86-64 the baseline is x86-64-v2 (SSE4.2), NumPy 2's own
baseline: a CPU below it cannot run NumPy 2 either. Other architectures get one build
for the compiler's default target.
"""

# name, compiler flags, NumPy's feature flag for the whole level (NumPy >= 2.4), and the
# single features that make it up (older NumPy reports only these). Best level last.
X86_64_LEVELS = (
    ("baseline", ("-march=x86-64-v2",), "X86_V2",
     ("SSE", "SSE2", "SSE3", "SSSE3", "SSE41", "SSE42", "POPCNT")),
    # AVX2; -ffp-contract=off (on every build) keeps FMA from changing any result
    ("v3", ("-march=x86-64-v3",), "X86_V3",
     ("AVX", "AVX2", "F16C", "FMA3", "BMI", "BMI2", "LZCNT", "MOVBE")),
    # AVX-512, with 512-bit vectors (GCC prefers 256-bit ones by default). Generic
    # tuning: on an AMD EPYC, -march=native (GCC 12: znver3 tuning and the later AVX-512
    # extensions) gave kernels no faster than these (benchmarks/results/isa_levels.txt)
    ("v4", ("-march=x86-64-v4", "-mprefer-vector-width=512"), "X86_V4",
     ("AVX512F", "AVX512CD", "AVX512BW", "AVX512DQ", "AVX512VL")),
)

OTHER_LEVELS = (("baseline", (), None, ()),)

# CYNORM_ARCH=native (or any -march value) builds one set of kernels, for this machine
# only, into this subpackage; the selector then uses it and nothing else.
SINGLE = "single"

# names CYNORM_ISA accepts; "v2" is the x86-64 baseline's other name
ALIASES = {"v2": "baseline"}


def levels_for(machine):
    """The levels built on (and for) a machine as reported by platform.machine()."""
    if machine.lower() in ("x86_64", "amd64"):
        return X86_64_LEVELS
    return OTHER_LEVELS
