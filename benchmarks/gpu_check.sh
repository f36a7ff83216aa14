#!/usr/bin/env bash
# GPU check, run on a lent device machine from the repository root:
#   bash benchmarks/gpu_check.sh            (results under $OUT, default ./gpu_out)
# That machine has torch + CUDA, triton, nvcc, pybind11, ninja and (as of 2026-11) pytest,
# pytest-benchmark, scipy, scikit-learn, safetensors, tqdm and matplotlib, but no network:
# the package is installed without build isolation or dependencies; anything missing can
# be carried as wheels in $WHEELS.
# Steps: build the CUDA extension for sm_90, print `ipfm-fast info`, run the whole test
# suite on the GPU (GPU-marked tests included), run every benchmark, pack the results.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/summary.txt"; }

{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  >"$OUT/env.txt" 2>&1
if [ -n "${WHEELS:-}" ]; then python3 -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl; fi

log "build (sm_90)"
IPFM_FAST_BUILD_CUDA=1 IPFM_FAST_CUDA_ARCHS=90 python3 -m pip install -q --no-build-isolation --no-deps -e . \
  >"$OUT/build.txt" 2>&1 || { log "BUILD FAILED"; tail -50 "$OUT/build.txt"; exit 1; }
python3 -m ipfm_fast info | tee "$OUT/info.txt"

log "tests"
python3 -m pytest -q -x tests -p no:cacheprovider >"$OUT/tests.txt" 2>&1; echo "tests rc=$?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT/tests.txt"

log "benchmarks"
python3 -m pytest -q benchmarks -p no:cacheprovider >"$OUT/bench.txt" 2>&1
echo "bench rc=$?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT/bench.txt"

tar -czf "$OUT/results.tar.gz" benchmarks/results
for f in benchmarks/results/*/*.md; do [ -f "$f" ] && cat "$f"; done | tee -a "$OUT/summary.txt" | tail -60
log "done"
