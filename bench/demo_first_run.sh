#!/usr/bin/env bash
# The README's demo from nothing cached, then again with everything cached, with wall and CPU
# time per stage (the demo prints them) and for the whole process (/usr/bin/time).
#
#   bench/demo_first_run.sh            # this machine as it is
#   bench/demo_first_run.sh avx2       # an AVX-512 machine held to AVX2 (see below)
#   THREADS=1 bench/demo_first_run.sh avx2   # one thread: CPU time = work, even on a busy machine
#
# "avx2" emulates a machine without AVX-512: torch's kernels (ATEN_CPU_CAPABILITY), MKL and
# oneDNN held to AVX2, OpenBLAS to its Haswell kernels, pmsolve's AVX-512 / bf16 kernels off.
# With torch below AVX-512, pmsolve counts bf16 as slow (pmsolve.models.precision), so the
# statistics' forward and v* run in fp32 as they would there. Clock speed, caches and memory
# stay this machine's: compare per-stage CPU times, not only the total.
set -euo pipefail
if [[ "${1:-}" == avx2 ]]; then
  export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell
  export PMSOLVE_AMX=0 PMSOLVE_DPBF16=0 PMSOLVE_F32_GRAM=0 PMSOLVE_F64_GEMM=0
fi
export OMP_NUM_THREADS=${THREADS:-2}
# On a busy machine, OMP_WAIT_POLICY=PASSIVE keeps CPU time to work, not threads spinning
# for a core another process holds; leave it unset for the figures a user would see.
export PMSOLVE_CACHE=$(mktemp -d /tmp/pmsolve-first-run.XXXXXX)
trap 'rm -rf "$PMSOLVE_CACHE"' EXIT
echo "$(date -u '+%F %T UTC') $(lscpu | sed -n 's/^Model name: *//p'), threads $OMP_NUM_THREADS, ${1:-native}, load $(cut -d' ' -f1-3 /proc/loadavg)"
for run in first cached; do
  echo "== $run run"
  /usr/bin/time -f "process: %e s wall, %U s user + %S s sys" pmsolve demo
done
