"""Training-step benchmark: time and peak memory of one LoRA+ optimizer step with full / s2 / sf attention.

    python bench/bench_train.py --model smollm2-135m-instruct --lengths 8192 16384 32768      # GPU
    python bench/bench_train.py --model llama2-7b-random --lengths 8192 16384                # random 7B shape, GPU
    python bench/bench_train.py --model smollm2-135m-instruct --lengths 1024 2048 --repeats 1  # CPU

Each step: forward + backward (activation checkpointing) + AdamW on the LoRA+ parameters, batch 1,
bf16 on GPU / fp32 on CPU. Patterns are measured in the same process on the same model, so ratios are
comparable. ``llama2-7b-random`` builds a random-initialised Llama-2-7B-shaped model (32 layers, 32
heads, d=4096) directly on the GPU; pass ``--kv-heads 8`` for a GQA variant.
Writes JSON rows to --out and prints a markdown table with each pattern's speed-up over ``full``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PATTERNS = ("full", "s2", "sf")


def build(name: str, target_len: int, kv_heads: int | None, device: str):
    from sinklora.models.lora import LoraSettings, apply_lora_plus

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if name == "llama2-7b-random":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=kv_heads or 32, vocab_size=32000, max_position_embeddings=4096,
                          rope_parameters={"rope_type": "linear", "factor": float(max(1, target_len // 4096)),
                                           "rope_theta": 10000.0})
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


def measure(model, pattern: str, n: int, repeats: int, device: str) -> dict:
    from sinklora.hf.attention import use_attention

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with use_attention(model, pattern, **({} if pattern == "full" else {"group_ratio": 0.25})):
        step()  # warm-up (compiles FlexAttention for this length)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"pattern": pattern, "n": n, "step_s": round(seconds, 3), "tokens_per_s": round(n / seconds),
            "peak_gib": round(peak, 2) if peak is not None else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    p.add_argument("--kv-heads", type=int, default=None, help="llama2-7b-random only: KV heads (GQA)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = build(args.model, max(args.lengths), args.kv_heads, args.device)
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    rows = []
    for n in args.lengths:
        for pattern in args.patterns:
            try:
                row = measure(model, pattern, n, args.repeats, args.device)
            except torch.OutOfMemoryError:
                row = {"pattern": pattern, "n": n, "error": "out of memory"}
            if args.device == "cuda":
                torch.cuda.empty_cache()
            row.update(model=args.model, device=card, kv_heads=args.kv_heads, torch=torch.__version__)
            print(json.dumps(row), flush=True)
            rows.append(row)
    full = {r["n"]: r["step_s"] for r in rows if r["pattern"] == "full" and "step_s" in r}
    print(f"\n{args.model} on {card}\n\n| N | pattern | step s | speed-up vs full | tokens/s | peak GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['n']} | {r['pattern']} | {r['error']} | | | |")
            continue
        ratio = f"{full[r['n']] / r['step_s']:.2f}x" if r["n"] in full else ""
        print(f"| {r['n']} | {r['pattern']} | {r['step_s']} | {ratio} | {r['tokens_per_s']} | {r['peak_gib']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
