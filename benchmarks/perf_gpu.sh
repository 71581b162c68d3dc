#!/usr/bin/env bash
# Issue 18's targets side by side, in one GPU session: three benchmarks/refresh.py train runs
# (about 6 minutes on an H200 before the unrolled rows; an unrolled 350m step compiles slower:
# give each run its own device call with RUNS=60m / RUNS=350m / RUNS=1b if one call of 10
# minutes cannot hold them), each a process of its own, of the Flax LLaMA of
# examples/llama/model.py, random tokens, pure bf16, cuDNN attention, one device), each row with
# its normal and refresh step times, effective tokens/s at T = 200, MFU (6N + 12 L D T model
# FLOPs over the device's dense bf16 peak, examples/llama/flops.py) and the ratio to
# optax.adamw of the same run:
#   1. 60m, rank 128, 4K-token batches (16 x 256), layer loop unrolled: optax.adamw,
#      galore_adamw[power] and ldadamw, each also with its cond decided on the host (no
#      lax.cond, whose predicate a GPU copies to the host every step) (targets: galore_adamw
#      normal step >= 0.95x optax.adamw, ldadamw >= 0.85x);
#   2. 350m, rank 256, batch 64 x 256, layer loop unrolled: the same five, optax.adamw with the
#      layers under a scan (what unrolling buys: the anchor's plain LLaMA lost 22% to a scan)
#      and, with galore-torch's wheel carried, torch AdamW and galore-torch (targets:
#      optax.adamw >= 55% of the measured bf16 matmul peak, galore_adamw effective >= 0.99x
#      optax.adamw and >= 2.5x galore-torch, ldadamw >= 0.95x);
#   3. 1b, rank 512, batch 32 x 256, layers under a scan (compiles fastest; the targets are
#      ratios): optax.adamw and galore_adamw[power] (targets: refresh step <= 0.1 s over a
#      normal step, effective >= 0.99x).
# Each writes benchmarks/results/refresh_<model>_gpu_train_power[_b16x256]_issue18.json.
# galore-torch: as in BENCHMARKS.md ("GPU runs"), carry .whl and install it first; without
# torch (TORCH= ) the 350m run skips those two rows.
# Usage: OUT=benchmarks/results [RUNS="60m 350m 1b"] bash benchmarks/perf_gpu.sh [refresh.py flags]
# CPU check at tiny size (tests/test_benchmarks.py checks the flags; at one size the three runs
# write one file name, so give them a scratch OUT): OUT=$(mktemp -d) M60=tiny M350=tiny \
#   M1B=tiny TORCH= bash benchmarks/perf_gpu.sh --train-steps 1 --refresh-repeats 1 --attention xla
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
TORCH=${TORCH---torch}
run() { ${PYTHON:-python} -m benchmarks.refresh --parts train --attention cudnn --methods power \
          --tag issue18 --out "$OUT" "$@"; }
for part in ${RUNS:-60m 350m 1b}; do
  case $part in
    60m) run --model "${M60:-60m}" --batch-size 16 --seq-len 256 --unroll all \
             --baselines ldadamw,ldadamw_host --host-refresh power "$@" ;;
    350m) run --model "${M350:-350m}" --unroll all \
              --baselines ldadamw,ldadamw_host,adamw_other_loop --host-refresh power $TORCH "$@" ;;
    1b) run --model "${M1B:-1b}" --baselines none "$@" ;;
    *) echo "RUNS: $part is not one of 60m 350m 1b" >&2; exit 2 ;;
  esac
done
