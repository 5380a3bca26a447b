#!/usr/bin/env bash
# The fused decode-step kernels on a GPU machine, in parts that each fit in a few minutes:
#
#   scripts/gpu_step_kernels.sh OUT_DIR tests     # step kernels vs the reference (fp32, bf16; batch 1/16/64;
#                                                 # in place, captured, by row index) and the planner's
#                                                 # captured searches: step_parity.{json,md}
#   scripts/gpu_step_kernels.sh OUT_DIR parity    # fused and fused_step backbones vs the reference,
#                                                 # prefill + decode: parity.{json,md}
#   scripts/gpu_step_kernels.sh OUT_DIR engine    # the engine's greedy tokens and planners on both backbones
#   scripts/gpu_step_kernels.sh OUT_DIR profile   # kernels per step and time per kernel class, step
#                                                 # timings: profile_step.{json,md}, timing.{json,md}
#   scripts/gpu_step_kernels.sh OUT_DIR bench     # crsm bench: engine (fused_step and fused), mamba_ssm's
#                                                 # generate, deliberation: bench/, benchmarks.md
#
# Run from the repository root with the GPU dependencies installed (mamba-ssm; see docs/benchmarks.md).
# Several parts may be given in one call; each one's output is also in OUT_DIR/<part>.log.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR PART...}
shift
[ $# -gt 0 ] || { echo "usage: $0 OUT_DIR tests|parity|engine|profile|bench ..." >&2; exit 2; }
mkdir -p "$out"
export OUT="$out" PYTHONPATH=.
status=0
for part in "$@"; do
  case "$part" in
    tests) cmd=(python3 -m pytest -q -p no:cacheprovider tests/gpu/test_step_kernels_gpu.py tests/test_captured_search.py
                tests/test_backbone.py) ;;
    parity) cmd=(python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused.py) ;;
    engine) cmd=(python3 -m pytest -q -p no:cacheprovider tests/gpu/test_engine_gpu.py) ;;
    profile) cmd=(bash -c "python3 scripts/profile_step.py --out '$out' && python3 scripts/gpu_parity.py --out '$out' --timing-only") ;;
    bench) cmd=(python3 -m crsm_core.cli bench --out "$out/bench" --docs "$out/benchmarks.md"
                --sections engine baselines deliberation) ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
  echo "== $part: ${cmd[*]}"
  "${cmd[@]}" 2>&1 | tee "$out/$part.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
