#!/usr/bin/env bash
# GPU check, run on a lent device machine from the repository root:
#   bash benchmarks/gpu_check.sh            (results under $OUT, default ./gpu_out)
# That machine has torch + CUDA, triton, nvcc, pybind11, ninja and (as of 2026-11) pytest,
# pytest-benchmark, scipy, scikit-learn, safetensors, tqdm and matplotlib, but no network:
# the package is installed without build isolation or dependencies; anything missing can
# be carried as wheels in $WHEELS.
# Steps: build the CUDA extension for sm_90, print `ipfm-fast info`, run the whole test
# suite on the GPU (GPU-marked tests included: the sync-debug distillation test among
# them), run every op benchmark, the end-to-end distillation step at CIFAR-10 size
# (47M-parameter U-Net, batch 256, or 128 if 256 does not fit) and its profile, pack the
# results.
#   STAGES="tests e2e" bash benchmarks/gpu_check.sh   (a subset: tests, bench, e2e; the build always runs)
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
STAGES=${STAGES:-"tests bench e2e"}
want() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p "$OUT"
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/summary.txt"; }

{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  >"$OUT/env.txt" 2>&1
if [ -n "${WHEELS:-}" ]; then python3 -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl; fi

log "build (sm_90)"
IPFM_FAST_BUILD_CUDA=1 IPFM_FAST_CUDA_ARCHS=90 python3 -m pip install -q --no-build-isolation --no-deps -e . \
  >"$OUT/build.txt" 2>&1 || { log "BUILD FAILED"; tail -50 "$OUT/build.txt"; exit 1; }
python3 -m ipfm_fast info | tee "$OUT/info.txt"

if want tests; then
log "tests"
python3 -m pytest -q -x tests -p no:cacheprovider >"$OUT/tests.txt" 2>&1; echo "tests rc=$?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT/tests.txt"
fi

if want bench; then
log "benchmarks"
python3 -m pytest -q benchmarks -p no:cacheprovider >"$OUT/bench.txt" 2>&1
echo "bench rc=$?" | tee -a "$OUT/summary.txt"
tail -5 "$OUT/bench.txt"
fi

if want e2e; then
log "end-to-end distillation step (CIFAR-10 size)"
UNET="--device cuda --arch unet --shape 3 32 32 --width 128 --depth 3 --mults 1 2 2 2"
for batch in 256 128; do
  python3 benchmarks/e2e.py $UNET --batch $batch --rounds 5 --iters 10 --warmup 3 >"$OUT/e2e.txt" 2>&1 && break
  echo "e2e at batch $batch failed (rc=$?)" | tee -a "$OUT/summary.txt"; tail -3 "$OUT/e2e.txt"
done
tail -2 "$OUT/e2e.txt" | tee -a "$OUT/summary.txt"
python3 benchmarks/e2e.py $UNET --batch $batch --rounds 5 --iters 10 --warmup 4 --cuda-graph >"$OUT/e2e_graph.txt" 2>&1
echo "e2e (CUDA graph) rc=$?" | tee -a "$OUT/summary.txt"; tail -2 "$OUT/e2e_graph.txt" | tee -a "$OUT/summary.txt"
python3 benchmarks/profile_step.py $UNET --batch $batch --iters 5 --warmup 3 >"$OUT/profile.txt" 2>&1
echo "profile rc=$?" | tee -a "$OUT/summary.txt"; tail -12 "$OUT/profile.txt"
fi

tar -czf "$OUT/results.tar.gz" benchmarks/results
for f in benchmarks/results/*/*.md; do [ -f "$f" ] && cat "$f"; done | tee -a "$OUT/summary.txt" | tail -60
log "done"
