#!/usr/bin/env bash
# The fused decode-step kernels on a GPU machine, in parts, each stopped at its time budget:
#
#   scripts/gpu_step_kernels.sh OUT_DIR                     # tests, profile, bench: under 5 minutes
#   scripts/gpu_step_kernels.sh OUT_DIR PART[:SECONDS] ...  # chosen parts (and budgets)
#
# part (default budget, s)  what                                                          writes to OUT_DIR
#   tests   (100)  tests/gpu/test_step_kernels_gpu.py: the step kernels vs the reference,   step_parity.{json,md}
#                  fp32 (256 steps) and bf16 (128), in place at batch 1/16/64, captured
#                  at 1/16, by row index at 16; each path's seconds and the compilations
#   profile  (40)  scripts/profile_step.py: kernels per step, time per kernel class, step   profile_step.{json,md}
#                  time, fused (before) and fused_step (after), batch 1/16/64
#   bench   (110)  crsm bench --sections engine baselines deliberation: the engine on       bench/, benchmarks.md
#                  fused_step and fused, mamba_ssm's generate, the planners (bench.json is
#                  rewritten after each section: a budget that runs out keeps the earlier ones)
#   parity  (300)  tests/gpu/test_fused.py: both GPU backbones vs the reference, prefill    parity.{json,md}
#                  and decode
#   engine  (300)  tests/gpu/test_engine_gpu.py: the engine's greedy tokens and planners
#                  on both GPU backbones
#   timing  (120)  scripts/gpu_parity.py --timing-only: eager and captured step times      timing.{json,md}
#
# Run from the repository root with the GPU dependencies installed (mamba-ssm; see docs/benchmarks.md).
# Each part's output is also in OUT_DIR/<part>.log; OUT_DIR/summary.txt says how each part ended.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [tests|profile|bench|parity|engine|timing[:SECONDS]] ...}
shift
[ $# -gt 0 ] || set -- tests profile bench
mkdir -p "$out"
export OUT="$out" PYTHONPATH=.
declare -A budget=([tests]=100 [profile]=40 [bench]=110 [parity]=300 [engine]=300 [timing]=120)
status=0
: >"$out/summary.txt"
for arg in "$@"; do
  part=${arg%%:*}
  case "$part" in
    tests) cmd=(python3 -m pytest -q -p no:cacheprovider tests/gpu/test_step_kernels_gpu.py) ;;
    profile) cmd=(python3 scripts/profile_step.py --out "$out") ;;
    bench) cmd=(python3 -m crsm bench --out "$out/bench" --docs "$out/benchmarks.md"
                --sections engine baselines deliberation) ;;
    parity) cmd=(python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused.py) ;;
    engine) cmd=(python3 -m pytest -q -p no:cacheprovider tests/gpu/test_engine_gpu.py) ;;
    timing) cmd=(python3 scripts/gpu_parity.py --out "$out" --timing-only) ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
  esac
  seconds=${budget[$part]}
  [ "$arg" = "$part" ] || seconds=${arg#*:}
  echo "== $part (at most $seconds s): ${cmd[*]}"
  start=$SECONDS
  timeout -k 10 "$seconds" "${cmd[@]}" 2>&1 | tee "$out/$part.log"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) result=passed ;;
    124|137) result="stopped at its budget of $seconds s" ;;
    *) result="failed (exit $rc)" ;;
  esac
  [ "$rc" -eq 0 ] || status=1
  echo "$part: $result after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
done
exit $status
