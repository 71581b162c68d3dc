#!/usr/bin/env bash
# GPU evidence for Fira, APOLLO and APOLLO-Mini (issue 19), on the same batches of the embedded
# corpus as llama_gpu.sh (BPE tokenizer, documents packed, pure bf16, cuDNN attention, sequence
# 256), each optimizer at its paper's settings (train.py's defaults: lr 1e-2 for all four
# projecting optimizers; alpha 0.25 for GaLore and Fira, 1 for APOLLO, sqrt(128) for
# APOLLO-Mini; T = 200; the limiter's gamma 1.01; AdamW lr 1e-3). --galore-scale is left out on
# purpose: one value would apply to every optimizer of the list.
#   60m: quality after the same 9.8M tokens (600 x 64 x 256) as AdamW and GaLore, rank 128.
#        Target: APOLLO and Fira at or below GaLore's validation perplexity.
#   350m: throughput, rank 256 (tokens/s is the median step time of each log window, so
#        GaLore's and Fira's refresh steps are excluded; APOLLO has none: its projection is
#        drawn from the key in every step). Target: APOLLO within 2% of AdamW's tokens/s.
# Usage: OUT=/some/dir [RUNS="60m 350m"] bash benchmarks/successors_gpu.sh [extra train.py flags,
#        e.g. --dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench}
common=(--tokenizer bpe --pack --dtype bf16 --attention cudnn --seq-len 256
        --update-proj-gap 200 --save-every 0 --log-every 25 --eval-tokens 100K)
for part in ${RUNS:-60m 350m}; do
  case $part in
    60m) python examples/llama/train.py --model 60m \
           --optimizer adamw,galore_adamw,fira_adamw,apollo_adamw,apollo_mini --rank 128 \
           --batch-size 64 --steps 600 --eval-every 200 "${common[@]}" "$@" \
           --out "$OUT/successors_60m" ;;
    350m) python examples/llama/train.py --model 350m \
            --optimizer adamw,apollo_adamw,apollo_mini,fira_adamw --rank 256 \
            --batch-size 64 --steps 300 --eval-every 0 "${common[@]}" "$@" \
            --out "$OUT/successors_350m" ;;
    *) echo "RUNS: $part is not one of 60m 350m" >&2; exit 2 ;;
  esac
  [[ " $* " == *" --dry-run "* ]] && continue  # nothing trained, nothing to plot
  title=$([[ $part == 60m ]] && echo "LLaMA-60M, rank 128" || echo "LLaMA-350M, rank 256")
  python examples/llama/plot.py "$OUT/successors_$part" --title "$title, T = 200, bf16"
done
