"""Training-step benchmark: one LoRA+ optimizer step with full / s2 / sf attention (time, memory, or counts).

    python bench/bench_train.py --model smollm2-135m-instruct --lengths 8192 16384 32768      # GPU
    python bench/bench_train.py --model llama2-7b-random --lengths 8192 16384                # random 7B shape, GPU
    python bench/bench_train.py --model smollm2-random --lengths 1024 --repeats 1 --device cpu
    python bench/bench_train.py --count --model smollm2-random --layers 4 --lengths 512 --device cpu

Each step: forward + backward (activation checkpointing) + AdamW on the LoRA+ parameters, bf16 on GPU /
fp32 on CPU. Patterns are measured in the same process on the same model, so ratios are comparable; the
first step of each (pattern, length) is a warm-up (FlexAttention compiles there: ``warmup_s``). Models:
a name or folder for :func:`sinklora.models.loading.load_model`, ``smollm2-random`` (SmolLM2-135M's shape,
random weights, ``--layers`` to shorten it) or ``llama2-7b-random`` (Llama-2-7B's shape, built on the
device; ``--kv-heads 8`` for a GQA variant). ``--backends default fused flex`` measures the sparse
patterns once per attention backend (``default`` = the device's rule, else forced through
``$SINKLORA_ATTENTION_BACKEND``); ``full`` always runs PyTorch's causal SDPA.

``--count`` (CPU proxy for the hot path): instead of timing, counts the operators dispatched and the
host reads (what synchronises with the GPU on CUDA; :mod:`sinklora.counters`) in one step,
for three batches: ``plain`` (one row, as ``sinklora train`` feeds), ``padded`` (two rows, right
padding, as the SFT collator) and ``packed`` (one row of three documents, positions restarting).
Writes JSON rows to --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

PATTERNS = ("full", "s2", "sf")
BATCHES = ("plain", "padded", "packed")


def build(name: str, target_len: int, kv_heads: int | None, device: str, layers: int | None = None):
    from sinklora.models.lora import LoraSettings, apply_lora_plus

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if name in ("llama2-7b-random", "smollm2-random"):
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=kv_heads or 32, vocab_size=32000, max_position_embeddings=4096)
                 if name == "llama2-7b-random" else
                 dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True))
        if layers:
            shape["num_hidden_layers"] = layers
        original = shape["max_position_embeddings"]
        cfg = LlamaConfig(**shape, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                    "factor": float(max(1, target_len // original))})
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
        model.set_attn_implementation("sdpa")
    else:
        from sinklora.models.loading import load_model

        model, _ = load_model(name, dtype=dtype, device=device, context_len=target_len)
    model = apply_lora_plus(model, LoraSettings())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def make_batch(kind: str, n: int, vocab: int, device: str) -> dict:
    """One training batch of ``kind`` (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    if kind == "padded":
        ids = torch.randint(0, vocab, (2, n), generator=g)
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, n * 3 // 4:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    else:
        ids = torch.randint(0, vocab, (1, n), generator=g)
        batch = {"input_ids": ids, "labels": ids}
        if kind == "packed":
            docs = (n // 4, n // 2, n - n // 4 - n // 2)
            batch["position_ids"] = torch.cat([torch.arange(d) for d in docs])[None]
    return {k: t.to(device) for k, t in batch.items()}


def _step_fn(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _attention_params(pattern: str) -> dict:
    return {} if pattern == "full" else {"group_ratio": 0.25}


def measure(model, pattern: str, n: int, repeats: int, device: str) -> dict:
    from sinklora.hf.attention import use_attention

    step = _step_fn(model, make_batch("plain", n, model.config.vocab_size, device))
    with use_attention(model, pattern, **_attention_params(pattern)):
        t0 = time.perf_counter()
        step()  # warm-up: compiles FlexAttention for this length
        if device == "cuda":
            torch.cuda.synchronize()
        warmup = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"pattern": pattern, "n": n, "step_s": round(seconds, 3), "warmup_s": round(warmup, 1),
            "tokens_per_s": round(n / seconds), "peak_gib": round(peak, 2) if peak is not None else None}


def count(model, pattern: str, kind: str, n: int, device: str) -> dict:
    """Operators and host reads of one training step (after a warm-up step): forward + backward, and
    the optimizer step apart (AdamW's reads are its step counters, host tensors: no GPU sync)."""
    from sinklora.counters import OpCounter
    from sinklora.hf.attention import use_attention

    batch = make_batch(kind, n, model.config.vocab_size, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with use_attention(model, pattern, **_attention_params(pattern)):
        for _ in range(2):  # a warm-up step, then the one counted (the counters keep the last)
            with OpCounter() as model_step:
                model(**batch).loss.backward()
            with OpCounter() as opt_step:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {"pattern": pattern, "batch": kind, "n": n, "layers": model.config.num_hidden_layers,
            "ops": model_step.ops, "kernels": model_step.kernels, "host_reads": model_step.host_reads,
            "reads": dict(sorted(model_step.reads.items())),
            "optimizer_ops": opt_step.ops, "optimizer_host_reads": opt_step.host_reads}


def _print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n")
    if rows and "ops" in rows[0]:
        print("| batch | pattern | backend | N | layers | forward+backward ops (not views) | host reads | which | "
              "optimizer ops / host reads |\n|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            which = ", ".join(f"{k} {v}" for k, v in r["reads"].items())
            print(f"| {r['batch']} | {r['pattern']} | {r['backend']} | {r['n']} | {r['layers']} | {r['ops']} "
                  f"({r['kernels']}) | {r['host_reads']} | {which} | {r['optimizer_ops']} / {r['optimizer_host_reads']} |")
        return
    full = {r["n"]: r["step_s"] for r in rows if r["pattern"] == "full" and "step_s" in r}
    print("| N | pattern | backend | step s | speed-up vs full | warm-up s | tokens/s | peak GiB |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['n']} | {r['pattern']} | {r['backend']} | {r['error']} | | | | |")
            continue
        ratio = f"{full[r['n']] / r['step_s']:.2f}x" if r["n"] in full else ""
        print(f"| {r['n']} | {r['pattern']} | {r['backend']} | {r['step_s']} | {ratio} | {r['warmup_s']} | "
              f"{r['tokens_per_s']} | {r['peak_gib']} |")


def _use_backend(backend: str) -> None:
    if backend == "default":
        os.environ.pop("SINKLORA_ATTENTION_BACKEND", None)
    else:
        os.environ["SINKLORA_ATTENTION_BACKEND"] = backend


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    p.add_argument("--backends", nargs="+", default=["default"], choices=["default", "grouped", "fused", "flex"],
                   help="attention backends for s2/sf (default: the device's rule)")
    p.add_argument("--kv-heads", type=int, default=None, help="llama2-7b-random only: KV heads (GQA)")
    p.add_argument("--layers", type=int, default=None, help="random models only: number of layers")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--count", action="store_true", help="count operators and host reads instead of timing")
    p.add_argument("--batches", nargs="+", default=list(BATCHES), choices=BATCHES, help="--count only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = build(args.model, max(args.lengths), args.kv_heads, args.device, args.layers)
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    rows = []
    for n in args.lengths:
        for kind in (args.batches if args.count else ["plain"]):
            for pattern in args.patterns:
                for backend in (["default"] if pattern == "full" else args.backends):
                    _use_backend(backend)
                    try:
                        row = count(model, pattern, kind, n, args.device) if args.count else \
                            measure(model, pattern, n, args.repeats, args.device)
                    except torch.OutOfMemoryError:
                        row = {"pattern": pattern, "n": n, "error": "out of memory"}
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                    row.update(backend=backend, model=args.model, device=card, kv_heads=args.kv_heads,
                               torch=torch.__version__)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    if args.out:  # written as they come: a stage cut by its time limit keeps what it measured
                        with open(args.out, "w") as f:
                            json.dump(rows, f, indent=1)
    _use_backend("default")
    _print_table(rows, f"{args.model} on {card}")


if __name__ == "__main__":
    main()
