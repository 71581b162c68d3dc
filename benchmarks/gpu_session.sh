#!/usr/bin/env bash
# One device call of a GPU session, prepared: the open issues' GPU measurements as named jobs,
# run in the order given, each under its own cap, all within BUDGET seconds, so that a call of
# at most 10 minutes never loses what it finished to the device's limit.  A job that would get
# less than its floor is skipped (not started: a half-compiled 7b step measures nothing).
# Every job writes under $OUT/session/<job>/ and its output goes to <job>.log there; a
# manifest (session.jsonl: a line per job, its command, cap, rc and seconds, or why it was
# skipped) grows after each job; at the end everything is packed into $OUT/gpu_session.tgz
# (a device call brings back at most 8 files).
#
# Jobs (estimated H200 seconds from the H100 runs in BENCHMARKS.md; issue):
#   successors   benchmarks/successors_gpu.sh: 60m quality, 350m tokens/s (~470; #19);
#                succ_60m, succ_350m: one of the two (~250 each)
#   memory_1b    benchmarks.memory --models 1b: 8 configurations (~300; #15)
#   memory_7b    benchmarks.memory --models 7b: 8 configurations (~560; #15), the headline
#                rows first (per-layer 8-bit GaLore, then per-layer 8-bit Adam)
#   memory_sltrain  benchmarks.memory --models 60m,350m --methods full,sltrain: AdamW's step
#                memory, SLTrain vs full-rank (~240; #17)
#   memory_sltrain_8bit  benchmarks.memory --models 1b,7b --methods sltrain, per-layer: 8-bit
#                SLTrain (SLTrain Fig. 3's 18.3 GB at 7B) and SLTrain with 8-bit GaLore
#                projecting its factors (~350; #15, #17)
#   first_7b     benchmarks.first_steps at full 7b depth, no warm-up vs the paper's (~200; #15)
#   compare      benchmarks.compare --models 350m,1b --torch (~540; #20)
#   llama, ldadam   benchmarks/llama_gpu.sh (~210) and ldadam_gpu.sh (~240): the LLaMA
#                section's AdamW / GaLore / LDAdam rows again, on today's validation split
#   perf_60m, perf_350m, perf_1b   benchmarks/perf_gpu.sh RUNS=<size> (~300 each; #18)
#   profile      the three benchmarks.profile_step commands: 350m unrolled and scanned, 1b
#                scanned (~400; #18)
#   conv_opt, conv_base, conv_apollo   the three 60m convergence calls (~450 each; #17;
#       carry ["runs/data"] after `python -m examples.llama.data.debian --download --out
#       runs/data/debian-docs` here); conv_opt_130m, conv_base_130m, conv_apollo_130m: the
#       same at 130m (rank 256), as device time allows
# galore-torch (compare, perf_350m): carry [".whl"] as in BENCHMARKS.md ("GPU runs"); this
# script installs it into /tmp/site when .whl/ holds its wheel.
#
# Usage: JOBS="successors memory_1b" OUT=$OUT bash benchmarks/gpu_session.sh
#        [BUDGET=560] [DRY=1: print the plan, each job counted at its cap; run nothing]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?OUT: the folder to write into (\$OUT on the device)}
BUDGET=${BUDGET:-560}
JOBS=${JOBS:?JOBS: a space-separated list of jobs (see the header of this script)}
PY=${PYTHON:-python}
WORK="$OUT/session"
START=$SECONDS

# name -> "cap floor command" (the command runs with $D, the job's folder, set)
job() {
  local size=60m
  [[ $1 == conv_*_130m ]] && size=130m
  local conv="--sizes $size --tokens 15M --batch-size 128 --data debian-docs"
  conv="$conv --tokenizer runs/data/debian-docs/bpe-32000.json --extra '--attention cudnn'"
  case $1 in
    successors) echo "540 300 OUT=\$D bash benchmarks/successors_gpu.sh" ;;
    succ_60m | succ_350m)
      echo "400 150 RUNS=${1#succ_} OUT=\$D bash benchmarks/successors_gpu.sh" ;;
    memory_1b) echo "400 60 $PY -m benchmarks.memory --models 1b --out \$D/memory_1b_gpu.json" ;;
    memory_7b) echo "560 120 $PY -m benchmarks.memory --models 7b --timeout 200 \
--out \$D/memory_7b_gpu.json" ;;
    memory_sltrain) echo "400 120 $PY -m benchmarks.memory --models 60m,350m --optimizers adamw \
--methods full,sltrain --per-layer off --out \$D/memory_sltrain_gpu.json" ;;
    memory_sltrain_8bit) echo "450 120 $PY -m benchmarks.memory --models 1b,7b \
--optimizers adamw_8bit,galore_adamw_8bit --methods sltrain --per-layer on --timeout 200 \
--out \$D/memory_sltrain_8bit_gpu.json" ;;
    first_7b) echo "300 200 $PY -m benchmarks.first_steps --models 7b \
--optimizers adamw,galore_adamw,galore_adamw_8bit --lrs 0.005 --batch-size 1 --seq-len 256 \
--eval-tokens 10K --out \$D/first_steps_7b_gpu.json" ;;
    compare) echo "560 540 $PY -m benchmarks.compare --models 350m,1b --torch \
--timeouts jax=180,torch=80 --out \$D/compare_gpu.json" ;;
    llama) echo "400 200 OUT=\$D bash benchmarks/llama_gpu.sh" ;;
    ldadam) echo "420 220 OUT=\$D bash benchmarks/ldadam_gpu.sh" ;;
    perf_60m | perf_350m | perf_1b)
      echo "560 300 RUNS=${1#perf_} OUT=\$D bash benchmarks/perf_gpu.sh" ;;
    profile) echo "560 200 $PY -m benchmarks.profile_step --model 350m --unroll all \
--attention cudnn --optimizers optax.adamw,galore_adamw --hlo --out \$D/profile_350m_gpu.json \
&& $PY -m benchmarks.profile_step --model 350m --unroll 1 --attention cudnn \
--optimizers optax.adamw --out \$D/profile_350m_scan_gpu.json \
&& $PY -m benchmarks.profile_step --model 1b --unroll 1 --attention cudnn \
--optimizers optax.adamw,galore_adamw --out \$D/profile_1b_scan_gpu.json" ;;
    conv_opt | conv_opt_130m) echo "560 450 $PY -m benchmarks.convergence $conv \
--methods full,galore,galore8bit,ldadam,fira --out \$D/convergence_${size}_optimizers" ;;
    conv_base | conv_base_130m) echo "560 450 $PY -m benchmarks.convergence $conv \
--methods lora,relora,lowrank,sltrain --out \$D/convergence_${size}_baselines" ;;
    conv_apollo | conv_apollo_130m) echo "560 200 $PY -m benchmarks.convergence $conv \
--methods apollo,apollo_mini --out \$D/convergence_${size}_apollo" ;;
    *) return 1 ;;
  esac
}

for name in $JOBS; do
  if ! job "$name" >/dev/null; then
    echo "JOBS: $name is not a job of benchmarks/gpu_session.sh" >&2; exit 2
  fi
done
mkdir -p "$WORK"
if ls .whl/galore_torch-*.whl >/dev/null 2>&1 && [[ -z ${DRY:-} ]]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

record() {  # one line of session.jsonl per job: name, command, then key=value pairs
  python3 -c 'import json, sys
row = {"job": sys.argv[1], "command": sys.argv[2]}
row.update(kv.split("=", 1) for kv in sys.argv[3:])
print(json.dumps({k: int(v) if v.isdigit() else v for k, v in row.items()}))' "$@" \
    >> "$WORK/session.jsonl"
}
planned=0
for name in $JOBS; do
  read -r cap floor cmd <<< "$(job "$name")"
  left=$((BUDGET - (SECONDS - START) - planned))
  limit=$((cap < left ? cap : left))
  if ((limit < floor)); then
    echo "[gpu_session] $name skipped: $left s of the budget left, it needs $floor"
    record "$name" "$cmd" "skipped=$left s of the budget left, floor $floor s"
    continue
  fi
  echo "[gpu_session] $name: up to $limit s: $cmd"
  if [[ -n ${DRY:-} ]]; then  # the plan counts each job at its cap: what surely fits
    record "$name" "$cmd" "cap_s=$limit" "dry=run nothing"; planned=$((planned + limit)); continue
  fi
  D="$WORK/$name"; mkdir -p "$D/tmp"; t0=$SECONDS
  # timeout leads a process group of its own, signals it at the cap, and returns when its
  # child (bash) is gone; train.py traps SIGTERM to save a checkpoint and would run on beside
  # the next job: whatever is left of the group is killed then.
  timeout --kill-after=10 "$limit" env D="$D" TMPDIR="$D/tmp" bash -c "$cmd" \
    > "$D/$name.log" 2>&1 &
  tpid=$!
  wait "$tpid"
  rc=$?
  kill -KILL -- "-$tpid" 2>/dev/null
  # A capped job's checkpoint (train.py's on SIGTERM; GBs at 7b, in its output folder or in
  # benchmarks.memory's temporary one) would fill the disk for the jobs after it.
  rm -rf "$D/tmp"; find "$D" -depth -type d -name checkpoints -exec rm -rf {} +
  echo "[gpu_session] $name: rc $rc after $((SECONDS - t0)) s"; tail -n 3 "$D/$name.log"
  record "$name" "$cmd" "cap_s=$limit" "rc=$rc" "seconds=$((SECONDS - t0))"
done
tar -czf "$OUT/gpu_session.tgz" --exclude=checkpoints -C "$OUT" session && rm -rf "$WORK"
echo "[gpu_session] $OUT/gpu_session.tgz after $((SECONDS - START)) s"
