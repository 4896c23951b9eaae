#!/usr/bin/env bash
# Builds the extension with ThreadSanitizer and runs a command under it (docs/reliability.md).
#   fuzz/build_tsan.sh [EVENTS]        fuzz/tsan_scenarios.py: reco.py's path on two threads, metrics scraped
#   fuzz/build_tsan.sh CMD [ARGS...]   CMD with the TSan build, e.g. .venv/bin/python -m pytest tests/test_framework.py
#
# clang only (-fsanitize=thread, CMake -DECLRECO_TSAN=ON, into build/tsan: the installed build is untouched).
# CPython is not instrumented, so the runtime is preloaded (clang's libclang_rt.tsan) and `import eclreco`
# is pointed at the TSan _core: build/tsan/site/eclreco links every file of the installed package (run
# `make install` first) but its _core, and PYTHONPATH puts it first (the subprocesses of the tests too).
# fuzz/tsan.supp keeps out the reports that lie entirely in uninstrumented libraries. Each report is
# printed (halt_on_error=0) and the exit status is 66 when there was one.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-.venv/bin/python}
command -v clang++ >/dev/null 2>&1 || { echo "build_tsan: clang++ not found (apt-get install clang)" >&2; exit 2; }
# clang 14's runtime, preloaded into an uninstrumented program, calls a null pointer at its start on
# Debian 12 (python, /bin/true: SIGSEGV at ip 0); GCC 12's libtsan.so.2 has the same entry points
# (__tsan_read4, __tsan_atomic*, ...) and runs: it is taken when clang's does not.
RUNTIME=$(clang -print-file-name=libclang_rt.tsan-x86_64.so)
if ! sh -c "LD_PRELOAD=\"$RUNTIME\" \"$PY\" -c pass" 2>/dev/null; then
  RUNTIME=$(g++ -print-file-name=libtsan.so.2 2>/dev/null || true)
  LD_PRELOAD="$RUNTIME" $PY -c pass || { echo "build_tsan: no TSan runtime runs under $PY" >&2; exit 2; }
fi
echo "build_tsan: runtime $RUNTIME" >&2
PYBIND11_DIR=$($PY -c "import pybind11; print(pybind11.get_cmake_dir())")
PKG=$($PY -c "import eclreco, os; print(os.path.dirname(eclreco.__file__))")
BUILD=build/tsan
cmake -S . -B $BUILD -DECLRECO_TSAN=ON -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$(readlink -f $PY)" >/dev/null
cmake --build $BUILD --target _core -j"${JOBS:-2}" >/dev/null
CORE=$(ls $BUILD/_core*.so)
SITE=$BUILD/site/eclreco
rm -rf $BUILD/site && mkdir -p $SITE
for f in "$PKG"/*; do
  case $(basename "$f") in _core*.so|__pycache__) ;; *) ln -s "$f" "$SITE/" ;; esac
done
ln -s "$REPO/$CORE" "$SITE/"
if [ $# -le 1 ] && [[ ${1:-2000} =~ ^[0-9]+$ ]]; then set -- $PY fuzz/tsan_scenarios.py "${1:-2000}"; fi
# exitcode=66 tells a report from a failing command
PYTHONPATH="$REPO/$BUILD/site${PYTHONPATH:+:$PYTHONPATH}" LD_PRELOAD="$RUNTIME" \
TSAN_OPTIONS="halt_on_error=0:report_signal_unsafe=0:second_deadlock_stack=1:exitcode=66:suppressions=$REPO/fuzz/tsan.supp${TSAN_OPTIONS:+:$TSAN_OPTIONS}" \
  "$@"
