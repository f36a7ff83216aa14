#!/usr/bin/env bash
# GPU check, run on a lent device machine from the repository root:
#   bash benchmarks/gpu_check.sh            (results under $OUT, default ./gpu_out)
# That machine has torch + CUDA, triton, nvcc, pybind11 and ninja but no network: the
# package is installed without build isolation or dependencies. Pure-Python test deps
# missing there (pytest-benchmark, scipy) can be carried as wheels in $WHEELS.
# Steps: build the CUDA extension for sm_90, print `ipfm-fast info`, run the whole test
# suite on the GPU (GPU-marked tests included), run every benchmark, pack the results.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/summary.txt"; }

{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  >"$OUT/env.txt" 2>&1
if [ -n "${WHEELS:-}" ]; then python -m pip install -q --no-index --find-links "$WHEELS" pytest pytest-benchmark scipy; fi

log "build (sm_90)"
IPFM_FAST_BUILD_CUDA=1 IPFM_FAST_CUDA_ARCHS=90 python -m pip install -q --no-build-isolation --no-deps -e . \
  >"$OUT/build.txt" 2>&1 || { log "BUILD FAILED"; tail -50 "$OUT/build.txt"; exit 1; }
python -m ipfm_fast info | tee "$OUT/info.txt"

log "tests"
python -m pytest -q -x tests -p no:cacheprovider >"$OUT/tests.txt" 2>&1; echo "tests rc=$?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT/tests.txt"

log "benchmarks"
python -m pytest -q benchmarks -p no:cacheprovider >"$OUT/bench.txt" 2>&1
echo "bench rc=$?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT/bench.txt"

tar -czf "$OUT/results.tar.gz" benchmarks/results
for f in benchmarks/results/*/*.md; do [ -f "$f" ] && cat "$f"; done | tee -a "$OUT/summary.txt" | tail -60
log "done"
