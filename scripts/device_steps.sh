#!/usr/bin/env bash
# One command on a lent GPU machine (the library's `device` tool): install the carried wheels and this checkout, record
# the machine, then run the named steps, each writing under $OUT. The device's copy has no git metadata, so the caller
# names the commit. benchmarks/README.md, "On a lent GPU", shows a call.
#   COMMIT=<hash> STEPS="tests kernel ab site host overhead e2e gen gelu" [TESTS=...] [VARIANTS=...] [PLANNERS=...] \
#     [DENSITIES=...] [TEMPORAL=N] [PROFILE=--profile] [LIMIT=s] [CACHE=shared] [GEN_VARIANTS=...] [GEN_STEPS=50] \
#     [AB_BASE=.ab/base] [SWEEP=--sweep] [KERNEL_ARGS=...] [OVERHEAD_VARIANTS=...] [HOST_PROFILE=N] \
#     bash scripts/device_steps.sh
# e2e compiles every variant cold (its own Inductor cache) unless CACHE=shared: only cold compile times compare.
set -uo pipefail
: "${COMMIT:?name the commit of this checkout}" "${STEPS:?name the steps}" "${OUT:?run under the device tool}"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || { echo "project install failed"; exit 1; }
{ echo "commit $COMMIT"; nvidia-smi --query-gpu=name --format=csv,noheader
  python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)'; date -u; } | tee "$OUT/device.txt"
for step in $STEPS; do
  case $step in
    tests)  # the GPU tests of the named files (default: every kernel's)
      timeout 300 python3 -m pytest -q -m gpu ${TESTS:-tests/test_kernels_*.py} 2>&1 | tee "$OUT/gpu-tests.txt" \
        | tail -5 ;;  # the whole output kept: a failure's values
    kernel)  # the planners' kernels alone: sampled rows, block ranking, block means (SWEEP=--sweep: their tiles and
      # splits; KERNEL_ARGS: e.g. --no-sampled-rows)
      timeout 200 python3 benchmarks/kernel.py --shapes wan1.3b --no-attention --no-permute --budget-ms 60 ${SWEEP:-} \
        ${KERNEL_ARGS:-} --out "$OUT/kernel.json" 2>&1 | tee "$OUT/kernel.txt" | tail -20 ;;
    ab)  # svg's sampled-row kernels against another checkout's kernels/ (AB_BASE), same inputs, one process
      timeout 200 python3 benchmarks/sampled_rows_ab.py --base "${AB_BASE:-.ab/base}" --out "$OUT/ab.json" 2>&1 \
        | tee "$OUT/ab.txt" | tail -30 ;;
    site)  # one Wan-1.3B layer's site taken apart: planning, permutation, kernel (PLANNERS, DENSITIES; TEMPORAL=N:
      # svg's temporal heads fixed at N)
      timeout 300 python3 benchmarks/site_breakdown.py --planners ${PLANNERS:-svg} --densities ${DENSITIES:-0.1} \
        ${TEMPORAL:+--temporal-heads $TEMPORAL} ${PROFILE:-} --out "$OUT/site.json" 2>&1 | tee "$OUT/site.txt" \
        | grep -v "^  *[0-9]" | tail -30 ;;
    host)  # the op's host cost per call, layer by layer, against SDPA's (seconds, no compiles)
      timeout 150 python3 benchmarks/site_breakdown.py --host-only --out "$OUT/host.json" 2>&1 | tee "$OUT/host.txt" \
        | head -3 ;;
    overhead)  # the small Wan model's forward, default options against Inductor, with and without CUDA graphs
      small=inductor,vsparse-defaults,inductor-reduce-overhead,vsparse-defaults-reduce-overhead
      timeout 300 python3 benchmarks/runtime_overhead.py --variants "${OVERHEAD_VARIANTS:-$small}" \
        ${HOST_PROFILE:+--host-profile $HOST_PROFILE} --out "$OUT/overhead.json" 2>&1 | tee "$OUT/overhead.txt" | tail -30 ;;
    e2e)  # whole Wan-1.3B forwards, Inductor dense first for the ratios
      shared=; [ "${CACHE:-cold}" = shared ] && shared=--shared-cache
      timeout "${LIMIT:-470}" python3 benchmarks/end_to_end.py $shared ${PROFILE:-} \
        --variants "${VARIANTS:-inductor,vsparse-svg-0.1}" --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.txt" \
        | grep -v "^  *[0-9]" | tail -40 ;;
    gen)  # whole Wan-1.3B generations (GEN_STEPS steps, CFG), the variants sharing one compile cache; an 8-step
      # warm-up compiles both phases (dense and sparse)
      timeout "${LIMIT:-470}" python3 benchmarks/generation.py --shared-cache --steps "${GEN_STEPS:-50}" \
        --warmup-steps 8 --variants ${GEN_VARIANTS:-inductor vsparse-defaults} --out "$OUT/generation.json" 2>&1 \
        | tee "$OUT/generation.txt" | tail -30 ;;
    gelu)  # a feed-forward's linear + tanh-GELU: Inductor's two kernels against cuBLASLt's GELU epilogue
      timeout 150 python3 benchmarks/linear_gelu.py --out "$OUT/linear_gelu.json" 2>&1 | tee "$OUT/linear_gelu.txt" \
        | tail -8 ;;
    *) echo "unknown step $step" ;;
  esac
done
