"""KV-cache policies against the full cache, measured in one run: KV memory, decode speed, passkey, perplexity.

For each policy (h2o, snapkv, sink, local) at each budget (ratios of the prompt) and the full cache:
- speed/memory: prefill a ``--prompt-len`` prompt, then decode ``--new-tokens`` tokens greedily one forward at a
  time (the loop ``generate`` runs, without its bookkeeping); median decode tokens/s over ``--trials``;
  KV bytes kept after the last step (exact tensor sizes), and the CUDA peak during decoding on GPU
  (`--trials 0` skips this part).
- passkey: :func:`sinklora.eval.passkey.run_passkey` with a fresh cache per prompt (budget = ratio of that prompt).
- perplexity: one held-out document of ``--ppl-tokens`` tokens streamed through the cache in chunks of
  ``--ppl-chunk`` tokens (chunk 1 = token by token; a chunk attends to the kept cache plus itself causally,
  then the cache evicts: at most chunk - 1 tokens more context than token by token). Budget = ratio of the document.

CPU smoke (~15 min on 2 busy cores): python bench/bench_cache.py --prompt-len 2048 --new-tokens 16 --trials 1 --warmup 0 \\
    --passkey-lengths 1024 2048 --passkey-depths 0.5 --passkey-trials 1 --ppl-tokens 1024 --ppl-chunk 64
GPU full (~3 min):          python bench/bench_cache.py --device cuda
Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from sinklora.hf.attention import attach_cache
from sinklora.hf.cache import make_cache

logger = logging.getLogger("bench_cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: fp32 on CPU, bf16 on GPU")
    p.add_argument("--policies", nargs="+", default=["h2o", "snapkv", "sink", "local"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.2, 0.1], help="ratios of the prompt")
    p.add_argument("--h2o-sinks", type=int, default=0, help="sink tokens for h2o (the sink policy uses 4)")
    p.add_argument("--score-method", default="chunked", choices=["chunked", "sdpa_grad"])
    p.add_argument("--positions", default="absolute", choices=["absolute", "rank"],
                   help="RoPE positions of kept tokens (rank: StreamingLLM's positions within the cache)")
    p.add_argument("--prompt-len", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--trials", type=int, default=2, help="speed repetitions (median); 0 skips the speed runs")
    p.add_argument("--warmup", type=int, default=1, help="untimed speed runs first")
    p.add_argument("--passkey-lengths", nargs="*", type=int, default=[2048, 4096, 8192])
    p.add_argument("--passkey-depths", nargs="*", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--passkey-trials", type=int, default=1)
    p.add_argument("--ppl-tokens", type=int, default=8192, help="0 skips perplexity")
    p.add_argument("--ppl-chunk", type=int, default=128)
    p.add_argument("--ppl-source", default="python-stdlib", help="sinklora.data.corpora source (held-out split)")
    p.add_argument("--out", default="outputs/bench_cache")
    return p.parse_args(argv)


def configs(args: argparse.Namespace) -> list[tuple[str, float | None]]:
    return [("full", None)] + [(p, b) for b in args.budgets for p in args.policies]


def build_cache(model, policy: str, budget: float | int | None, args: argparse.Namespace):
    sinks = args.h2o_sinks if policy == "h2o" else None
    positions = "absolute" if policy == "full" else args.positions
    return make_cache(model, policy, budget, sink_tokens=sinks, score_method=args.score_method, positions=positions)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(model, ids: torch.Tensor, policy: str, budget: float | None, args) -> dict:
    """Prefill + greedy decode, one forward per token; -> timings and KV memory."""
    device = ids.device
    runs = []
    for trial in range(args.warmup + args.trials):
        cache = build_cache(model, policy, budget, args)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), attach_cache(model, cache) as cache_kw:
            out = model(input_ids=ids[None], logits_to_keep=1, **cache_kw)
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            t1 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            for _ in range(args.new_tokens):
                out = model(input_ids=token, logits_to_keep=1, **cache_kw)
                token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            t2 = time.perf_counter()
        stats = cache.stats()
        run = {"prefill_s": t1 - t0, "decode_tokens_per_s": args.new_tokens / (t2 - t1),
               "kv_bytes": stats["kv_bytes"], "max_kv_bytes": stats["max_kv_bytes"],
               "kept_tokens": stats["kept_tokens"], "seen_tokens": stats["seen_tokens"], "split": stats["split"]}
        if device.type == "cuda":
            run["cuda_decode_peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
        if trial >= args.warmup:
            runs.append(run)
        del cache
    med = {k: statistics.median(r[k] for r in runs) for k in ("prefill_s", "decode_tokens_per_s")}
    return {**runs[-1], **med, "decode_tokens_per_s_runs": [r["decode_tokens_per_s"] for r in runs]}


def streaming_perplexity(model, ids: torch.Tensor, policy: str, budget: int | None, args) -> float:
    cache = build_cache(model, policy, budget, args)
    nll, count = 0.0, 0
    with torch.inference_mode(), attach_cache(model, cache) as cache_kw:
        for start in range(0, ids.numel() - 1, args.ppl_chunk):
            x = ids[start:start + args.ppl_chunk]
            target = ids[start + 1:start + 1 + x.numel()]
            logits = model(input_ids=x[None], **cache_kw).logits[0, :target.numel()].float()
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += target.numel()
    return float(torch.tensor(nll / count).exp())


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    """An n-token passkey-style prompt (filler text with one key in the middle)."""
    try:
        from sinklora.eval.passkey import build_passkey_prompt
    except ImportError:
        build_passkey_prompt = None
    if build_passkey_prompt is not None:
        return build_passkey_prompt(tokenizer, n, 0.5, 12345)[1]
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    ids = tokenizer(filler * (n // 10 + 10)).input_ids[:n]
    return torch.tensor(ids)


def document_ids(tokenizer, source: str, n: int) -> torch.Tensor:
    from sinklora.data.corpora import load_documents

    docs = sorted(load_documents(source, "heldout"), key=lambda d: len(d.text), reverse=True)
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc.text).input_ids
        if len(ids) >= n:
            break
    if len(ids) < n:
        logger.warning("held-out %s has only %d tokens; perplexity over those", source, len(ids))
    return torch.tensor(ids[:n])


def markdown(results: dict) -> str:
    rows = results["rows"]
    full = next(r for r in rows if r["policy"] == "full")
    lengths = results["settings"]["passkey_lengths"]
    timed = "decode_tokens_per_s" in full
    head = ["policy", "budget"]
    head += ["kept tokens", "KV MiB", "KV vs full", "prefill s", "decode tok/s", "speedup"] if timed else []
    head += [f"passkey {n}" for n in lengths] + (["ppl"] if "ppl" in full else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["policy"], "-" if r["budget"] is None else f"{r['budget']:.0%}"]
        if timed:
            cells += [str(r["kept_tokens"]), f"{r['kv_bytes'] / 2**20:.1f}", f"{r['kv_bytes'] / full['kv_bytes']:.2f}",
                      f"{r['prefill_s']:.2f}", f"{r['decode_tokens_per_s']:.1f}",
                      f"{r['decode_tokens_per_s'] / full['decode_tokens_per_s']:.2f}x"]
        cells += [f"{a:.2f}" for a in r.get("passkey_by_length", [float('nan')] * len(lengths))]
        if "ppl" in full:
            cells.append(f"{r['ppl']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    s = results["settings"]
    parts = [f"{s['model']} on {s['device_name']} ({s['dtype']}), {s['positions']} positions"]
    if timed:
        parts.append(f"prompt {s['prompt_len']} tokens, {s['new_tokens']} decoded tokens, median of {s['trials']}")
    if lengths:
        parts.append(f"passkey depths {s['passkey_depths']} x {s['passkey_trials']} trials")
    if "ppl" in full:
        parts.append(f"perplexity: {s['ppl_tokens']} tokens of held-out {s['ppl_source']} in chunks of {s['ppl_chunk']}")
    parts.append(f"transformers {s['transformers']}, torch {s['torch']}.")
    lines += ["", "; ".join(parts)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import transformers

    from sinklora.eval.passkey import run_passkey
    from sinklora.models.loading import load_model

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    model.eval()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = prompt_ids(tokenizer, args.prompt_len).to(device)
    doc = document_ids(tokenizer, args.ppl_source, args.ppl_tokens).to(device) if args.ppl_tokens else None
    rows = []
    for policy, budget in configs(args):
        t0 = time.perf_counter()
        row = {"policy": policy, "budget": budget, **(speed(model, ids, policy, budget, args) if args.trials else {})}
        if args.passkey_lengths:
            pk = run_passkey(model, tokenizer, args.passkey_lengths, args.passkey_depths, args.passkey_trials,
                             cache_factory=lambda: build_cache(model, policy, budget, args), progress=False)
            row["passkey_by_length"] = pk["accuracy_by_length"]
            row["passkey"] = {k: pk[k] for k in ("lengths", "depths", "accuracy", "digit_accuracy", "prompt_tokens")}
        if doc is not None:
            doc_budget = None if budget is None else max(1, round(budget * doc.numel()))
            row["ppl"] = streaming_perplexity(model, doc, policy, doc_budget, args)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        logger.info("%s %s: %s", policy, budget, {k: v for k, v in row.items() if k not in ("passkey", "split")})
        rows.append(row)
    results = {"settings": {**vars(args), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu", "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
                            "transformers": transformers.__version__, "threads": torch.get_num_threads()},
               "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (out_dir / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
