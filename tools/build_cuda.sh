#!/usr/bin/env bash
# Compile-and-link check of the CUDA backend, on a machine with nvcc and no GPU.
#
#   tools/build_cuda.sh            # uses `python` (the active venv: pybind11, scipy-openblas32)
#   PYTHON=/path/python tools/build_cuda.sh
#
# Installs the cuBLAS/cuSOLVER wheels into build/cuda-deps (not into the venv,
# so the CPU build and tests never see them), builds pmsolve._C with
# -DPMSOLVE_CUDA=ON into build/cuda, then imports the result: the import
# resolves every cuBLAS/cuSOLVER/CUDA symbol (Python loads extensions with
# RTLD_NOW) and checks that a CUDA build still loads where no GPU exists.
# Fails on the first compile, link or import error.
#
# Downloads (measured 2026-11): nvidia-cublas 424 MiB and nvidia-cusolver
# 248 MiB, needed to compile and link; nvidia-cusparse 220 MiB and
# nvidia-nvjitlink 44 MiB, libcusolver's own load-time dependencies, needed
# only for the import check. 1.2 GiB on disk once installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEPS=$PWD/build/cuda-deps
WHEELS=("nvidia-cublas==13.*" "nvidia-cusolver==12.*" "nvidia-cusparse==12.*" "nvidia-nvjitlink==13.*")

t0=$(date +%s)
stamp="$DEPS/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${WHEELS[*]}" ]; then
  rm -rf "$DEPS"
  # --no-deps: cuBLAS pulls in nvidia-cuda-nvrtc, which nothing here loads.
  "$PY" -m pip install --quiet --no-deps --no-compile --target "$DEPS" "${WHEELS[@]}"
  echo "${WHEELS[*]}" >"$stamp"
fi
t1=$(date +%s)

"$PY" -c "import pybind11, scipy_openblas32" || {
  echo "build_cuda.sh: $PY lacks pybind11 or scipy-openblas32 (pip install -e '.[test]' first)" >&2
  exit 1
}
cmake -S . -B build/cuda -GNinja -DPMSOLVE_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/build/cuda/lib" \
  -DPMSOLVE_CUDA_LIB_ROOT="$DEPS/nvidia/cu13"
cmake --build build/cuda
t2=$(date +%s)

lib=$(ls build/cuda/lib/_C*.so)
PMSOLVE_NATIVE_LIB="$PWD/$lib" "$PY" - <<'EOF'
from pmsolve._native import require_native

m = require_native()
missing = [f for f in ("cuda_device_count", "cuda_cholesky_jittered", "cuda_cond_estimate", "cuda_pm_solve") if not hasattr(m, f)]
assert not missing, f"CUDA build lacks {missing}"
print(f"import check: {m.__file__} loads; CUDA devices visible: {m.cuda_device_count()}")
EOF
echo "build_cuda.sh: OK ($lib); wheels $((t1 - t0)) s, configure+build $((t2 - t1)) s"
