#!/usr/bin/env bash
# Builds the extension for fuzzing and runs both harnesses (envelope, payload).
#   fuzz/build_sanitized.sh [RUNS] [SECONDS]   (default 1000000 inputs per harness, no time limit)
#
# With clang (Debian: apt-get install clang) the build is coverage-instrumented for libFuzzer
# (-fsanitize=address,undefined,fuzzer-no-link, CMake -DECLRECO_FUZZ=ON) and runs under atheris'
# ASan runtime (asan_with_fuzzer.so, which also carries the UBSan handlers): the fuzzer sees the
# C++ branches. Without clang it falls back to g++ with ASan + UBSan (-DECLRECO_SANITIZE=ON):
# sanitizers but no native coverage, so only the harness' Python coverage guides the fuzzer.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-1000000}
SECONDS_MAX=${2:-0}
PY=${PY:-.venv/bin/python}
PYBIND11_DIR=$($PY -c "import pybind11; print(pybind11.get_cmake_dir())")
ATHERIS_DIR=$($PY -c "import atheris; print(atheris.path())")
if command -v clang++ >/dev/null 2>&1 && [ -f "$ATHERIS_DIR/asan_with_fuzzer.so" ] && [ -z "${ECLRECO_FUZZ_GCC:-}" ]; then
  MODE=clang; BUILD=build/fuzz
  cmake -S . -B $BUILD -DECLRECO_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$(readlink -f $PY)" >/dev/null
  PRELOAD="$ATHERIS_DIR/asan_with_fuzzer.so"
else
  MODE=gcc; BUILD=build/sanitize
  echo "fuzz: clang or atheris' asan_with_fuzzer.so not found: g++ ASan+UBSan build WITHOUT native coverage" >&2
  cmake -S . -B $BUILD -DECLRECO_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$(readlink -f $PY)" >/dev/null
  PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
fi
cmake --build $BUILD --target _core -j2 >/dev/null
CORE=$(ls $BUILD/_core*.so)
for kind in envelope payload; do
  echo "== $kind: $RUNS inputs ($MODE build, ASan + UBSan)"
  # Python itself leaks by design: leak detection off; everything else aborts on the first report.
  ECLRECO_CORE=$CORE ECLRECO_FUZZ_CORPUS=$BUILD/corpus-$kind \
  LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    $PY fuzz/harness.py $kind -dict=fuzz/$kind.dict -runs=$RUNS -max_total_time=$SECONDS_MAX -max_len=4096 -print_final_stats=1 \
    -artifact_prefix=$BUILD/crash-$kind- 2>&1 \
    | grep -E "INITED|DONE|^Done|stat::|ERROR|SUMMARY|runtime error|crash|Test unit written|no interesting"
  echo "corpus: $(ls $BUILD/corpus-$kind | wc -l) files"
done
