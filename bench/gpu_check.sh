#!/usr/bin/env bash
# The CUDA backend's check on a GPU machine, in one command of under 5 minutes:
# build pmsolve._C with CUDA, run tests/test_cuda.py and tests/test_gpu_pipeline.py, run
# the quick CUDA tests under compute-sanitizer, time factorize/solve on issue 2's grid
# against torch.linalg and the MEMIT formula, and the statistics accumulator on the GPU.
# Everything it prints also goes to $OUT (bench/README-GPU.md says how to run it).
#
#   bench/gpu_check.sh --fetch   # here, with network: the one wheel the GPU image lacks
#   bench/gpu_check.sh           # on the GPU machine (carry build/gpu-wheels)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=build/gpu-wheels
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch" ]; then
  # scipy-openblas32 (the CPU core's BLAS, which _C always links) is not in the GPU
  # image; fetch the version installed here, for the image's Python 3.12.
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('scipy-openblas32'))") || exit 1
  exec "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "scipy-openblas32==$version"
fi

OUT=${OUT:-$PWD/build/gpu-check-out}
mkdir -p "$OUT"
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S))"; }

main() {
  status=0

  step "device"
  nvidia-smi -L
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" || return 1
  nvcc --version | tail -1
  if ! "$PY" -c "import scipy_openblas32" 2>/dev/null; then
    ls $WHEELS/scipy_openblas32-*.whl >/dev/null 2>&1 || { echo "no $WHEELS/scipy_openblas32-*.whl: run bench/gpu_check.sh --fetch here first, carry $WHEELS"; return 1; }
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/pmsolve-site $WHEELS/scipy_openblas32-*.whl || return 1
    export PYTHONPATH=/tmp/pmsolve-site
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

  step "build (cuBLAS/cuSOLVER from the image's nvidia wheels)"
  t0=$(date +%s)
  cmake -S . -B build/cuda-gpu -GNinja -DPMSOLVE_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/build/cuda-gpu/lib" >"$OUT/cmake.log" 2>&1 &&
    cmake --build build/cuda-gpu -j "$(nproc)" || { tail -50 "$OUT/cmake.log"; echo "BUILD FAILED"; return 1; }
  echo "build: $(($(date +%s) - t0)) s"
  PMSOLVE_NATIVE_LIB=$(ls "$PWD"/build/cuda-gpu/lib/_C*.so)
  export PMSOLVE_NATIVE_LIB

  step "tests/test_cuda.py tests/test_gpu_pipeline.py"
  "$PY" -m pytest tests/test_cuda.py tests/test_gpu_pipeline.py -q -rs -s -p no:cacheprovider \
    --junitxml="$OUT/test_cuda.xml" || status=1

  step "compute-sanitizer memcheck (quick tests; torch's caching allocator off so overruns reach memcheck)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 99 \
    "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "dead_units or repeated_keys or indefinite or argument_checks"
  rc=$?
  case $rc in 0) echo "memcheck: clean" ;; 124) echo "memcheck: TIMED OUT (not a failure of the code)" ;; *) echo "memcheck: FAILED (rc $rc)"; status=1 ;; esac

  step "bench: solver fp64 d in {1536, 4096, 6400} x n in {1, 16, 256, 1024}; GPU statistics d in {1536, 6400}, fp32 and bf16 rows"
  # shellcheck disable=SC2086  # GPU_BENCH_ARGS: extra options, e.g. "--d 6400 --no-experiment"
  "$PY" bench/gpu_bench.py --out "$OUT/gpu_bench.json" ${GPU_BENCH_ARGS:-} || status=1

  step "done: $([ $status = 0 ] && echo OK || echo FAILURES)"
  return $status
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
