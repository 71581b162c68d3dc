#!/usr/bin/env bash
# GPU evidence for the LLaMA example: AdamW vs GaLore-AdamW on the same batches of the
# embedded corpus, pure bf16, cuDNN attention. Writes each run's metrics under $OUT (default
# runs/bench), prints the comparison tables and draws curves.png (examples/llama/plot.py) in each.
#   60m: quality (validation perplexity after the same tokens), tokens/s, peak memory.
#   350m: throughput only (tokens/s is the median step time, so refresh steps are excluded).
# The embedded corpus is ~2.9M BPE tokens (examples/llama/README.md), so documents are packed
# (every token used) and the 60m run stops at ~3.4 epochs (600 x 64 x 256 = 9.8M tokens);
# validation is the whole validation split (~56K target tokens with Python 3.11's library,
# 45K with 3.12.1's).
# Usage: OUT=/some/dir bash benchmarks/llama_gpu.sh [extra train.py flags, e.g. --dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench}
common=(--optimizer adamw,galore_adamw --tokenizer bpe --pack --dtype bf16 --attention cudnn
        --seq-len 256 --update-proj-gap 200 --galore-scale 0.25 --save-every 0 --log-every 25
        --eval-tokens 100K)
python examples/llama/train.py --model 60m --rank 128 --batch-size 64 --steps 600 \
  --eval-every 200 "${common[@]}" "$@" --out "$OUT/llama_60m"
python examples/llama/train.py --model 350m --rank 256 --batch-size 64 --steps 300 \
  --eval-every 0 "${common[@]}" "$@" --out "$OUT/llama_350m"
[[ " $* " == *" --dry-run "* ]] && exit 0  # nothing trained, nothing to plot
python examples/llama/plot.py "$OUT/llama_60m" --title "LLaMA-60M, rank 128, T = 200, bf16"
python examples/llama/plot.py "$OUT/llama_350m" --title "LLaMA-350M, rank 256, T = 200, bf16"
