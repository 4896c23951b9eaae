#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer into build/sanitize and
# runs both harnesses. Usage: fuzz/build_sanitized.sh [RUNS]   (default 1000000 per harness)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1000000}
PY=${PY:-.venv/bin/python}
PYBIND11_DIR=$($PY -c "import pybind11; print(pybind11.get_cmake_dir())")
cmake -S . -B build/sanitize -DECLRECO_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$(readlink -f $PY)" >/dev/null
cmake --build build/sanitize --target _core -j2 >/dev/null
CORE=$(ls build/sanitize/_core*.so)
ASAN_LIB=$(g++ -print-file-name=libasan.so)
UBSAN_LIB=$(g++ -print-file-name=libubsan.so)
for kind in envelope payload; do
  echo "== $kind: $RUNS inputs (ASan + UBSan)"
  # Python itself leaks by design: leak detection off; everything else aborts on the first report.
  ECLRECO_CORE=$CORE ECLRECO_FUZZ_CORPUS=build/sanitize/corpus-$kind \
  LD_PRELOAD="$ASAN_LIB $UBSAN_LIB" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    $PY fuzz/harness.py $kind -runs=$RUNS -max_len=4096 -print_final_stats=1 2>&1 | tail -12
done
