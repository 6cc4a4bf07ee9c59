#!/usr/bin/env bash
# Build cynorm with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch copy of the
# working tree and run (part of) the test suite against that build.
#
#   scripts/sanitize.sh                      # default test selection (see below)
#   scripts/sanitize.sh tests/test_x.py -k y # any pytest arguments instead
#
# Environment:
#   CYNORM_ASAN_DIR   scratch copy (default /tmp/cynorm-asan; wiped and re-created)
#   PYTHON            interpreter (default: python3 on PATH, e.g. the CI virtualenv)
#   CC                C compiler (default gcc; its libasan is preloaded)
#   CYNORM_ASAN_REUSE=1  keep an existing scratch copy and build, refreshing only tests/
#                     (fast reruns; cynorm's sources are then NOT refreshed)
#
# Exit status: non-zero when the build fails, a test fails, or a sanitizer reports an
# error (UBSan halts on the first one; ASan aborts on the first invalid access).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${CYNORM_ASAN_DIR:-/tmp/cynorm-asan}"
PY="${PYTHON:-python3}"
CC="${CC:-gcc}"

case "$DEST" in
    /|"$REPO"|"$REPO"/*) echo "sanitize.sh: refusing to use $DEST as scratch dir" >&2; exit 2 ;;
esac

if [ "${CYNORM_ASAN_REUSE:-0}" = 1 ] && compgen -G "$DEST/cynorm/_kernels/_*/*.so" >/dev/null; then
    echo "sanitize.sh: reusing the build in $DEST (tests/ refreshed)" >&2
    rm -rf "$DEST/tests"
    cp -r "$REPO/tests" "$DEST/tests"
    cd "$DEST"
else
    # 1. A clean copy of the working tree (tracked and untracked files, not the in-place
    #    build products, virtualenvs or caches), so the in-place build in $REPO is
    #    untouched.
    rm -rf "$DEST"
    mkdir -p "$DEST"
    tar -C "$REPO" -cf - \
        --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude='*.so' \
        --exclude='./cynorm/_kernels/*.c' --exclude='./cynorm/*.c' --exclude='*.html' --exclude=__pycache__ \
        --exclude=.hypothesis --exclude=.pytest_cache --exclude='*.egg-info' . \
      | tar -C "$DEST" -xf -

    # 2. Debug build (bounds checks on, -O1 -g) instrumented with ASan and UBSan. Needs
    #    the build requirements in the interpreter's environment (pip install -e uses an
    #    isolated build environment, so a CI virtualenv may lack them).
    "$PY" -c "import Cython, setuptools, numpy" 2>/dev/null || {
        echo "sanitize.sh: $PY needs Cython, setuptools and numpy to build:" >&2
        echo "    $PY -m pip install 'Cython>=3.0' setuptools numpy" >&2
        exit 1
    }
    cd "$DEST"
    echo "sanitize.sh: building in $DEST" >&2
    # one build of the kernels (CYNORM_ARCH=native): the per-level builds compile the
    # same sources, and three instrumented builds would triple the build time
    CC="$CC" CYNORM_ARCH=native CYNORM_DEBUG=1 CYNORM_SANITIZE=address,undefined \
        "$PY" setup.py build_ext --inplace >"$DEST/build.log" 2>&1 \
        || { tail -n 50 "$DEST/build.log" >&2; echo "sanitize.sh: build failed" >&2; exit 1; }
fi

LIBASAN="$("$CC" -print-file-name=libasan.so)"
if [ ! -e "$LIBASAN" ]; then
    echo "sanitize.sh: $CC has no libasan.so ($LIBASAN)" >&2
    exit 1
fi
# libstdc++ preloaded right after libasan: ASan's __cxa_throw interceptor looks the real
# function up at start-up, and C++ exceptions (torch, in the torch-bridge tests) abort
# with "CHECK failed: real___cxa_throw" when libstdc++ is only loaded later.
PRELOAD="$LIBASAN"
LIBSTDCXX="$("$CC" -print-file-name=libstdc++.so.6)"
[ -e "$LIBSTDCXX" ] && PRELOAD="$PRELOAD:$LIBSTDCXX"

# 3. The tests. Default selection: the hardening tests (fuzzing, threads, fork,
#    extremes) and the per-op test modules; huge-array and RSS-leak tests skip
#    themselves under CYNORM_SANITIZED=1 (ASan's shadow memory and quarantine make
#    them meaningless). The hypothesis tests run fewer examples (CYNORM_FUZZ_EXAMPLES).
if [ "$#" -eq 0 ]; then
    set -- tests -q -p no:cacheprovider \
        --ignore=tests/test_hardening_huge.py --ignore=tests/test_hardening_leaks.py
fi

# detect_leaks=0: CPython itself "leaks" at exit. PYTHONMALLOC=malloc: every Python
# allocation goes through ASan's malloc, so overruns into Python objects are caught.
# --capture=sys: pytest captures Python's sys.stdout/err only, so a sanitizer report
# (written to file descriptor 2 just before the process aborts) is not swallowed;
# abort_on_error makes pytest's faulthandler print the Python stack, naming the test.
export LD_PRELOAD="$PRELOAD${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONMALLOC=malloc
export PYTHONPATH="$DEST${PYTHONPATH:+:$PYTHONPATH}"
export CYNORM_SANITIZED=1
# large outputs from malloc, not the output cache's own mappings, so that ASan guards
# their ends too (tests/test_output_cache.py turns the cache on for itself)
export CYNORM_OUTPUT_CACHE_MB=0
export CYNORM_FUZZ_EXAMPLES="${CYNORM_FUZZ_EXAMPLES:-40}"
echo "sanitize.sh: running pytest $* (LD_PRELOAD=$LD_PRELOAD)" >&2
"$PY" -c "import cynorm; assert cynorm.__file__.startswith('$DEST'), cynorm.__file__"
set +e
"$PY" -m pytest --capture=sys -rfE "$@"
rc=$?
set -e
echo "sanitize.sh: exit status $rc" >&2
exit "$rc"
