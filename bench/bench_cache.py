"""KV-cache policies against the full cache: KV memory, ATen ops per decode step, decode speed, prefill,
passkey and perplexity; every policy x budget, one part at a time, merged into one table.

Parts (``--parts``, each a list of rows written to ``--out`` after every row, so nothing is lost and
``--resume`` skips the rows already there):

- ``speed``: the full cache and each policy prefill the same ``--prompt-len`` prompt; then, alternating
  full / policy in blocks of ``--block`` greedy one-token forwards (``--rounds`` each), decode tokens/s
  and its ratio to the full cache's in the same round (median over rounds). Then the ATen operations of
  the next decode steps are counted (:class:`sinklora.counters.OpCounter`): 64 steps, rounded up to
  whole eviction periods (``slack + 1`` steps) so the eviction is counted in proportion. KV MiB: the
  bytes the cache holds (allocated buffers: budget + slack + 1 slots). Prefill: one timing per policy
  (full: the first and the last of the run).
- ``prefill``: prefill time alternated full / policy ``--prefill-repeats`` times, median ratio.
- ``passkey``: :func:`sinklora.eval.passkey.run_passkey`, a fresh cache per prompt (budget = ratio of it).
- ``ppl``: one held-out document of ``--ppl-tokens`` tokens fed ``--ppl-chunk`` tokens at a time through
  the cache (budget = ratio of the document).

    python bench/bench_cache.py --parts speed --out bench/results/cpu_cache_speed_8k.json
    python bench/bench_cache.py --parts passkey --out bench/results/cpu_cache_passkey_4k.json
    python bench/bench_cache.py --table bench/results/cpu_cache_*_*.json     # the merged markdown table
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from sinklora.counters import OpCounter
from sinklora.hf.attention import attach_cache
from sinklora.hf.cache import make_cache

logger = logging.getLogger("bench_cache")
sys.path.insert(0, str(Path(__file__).parent))  # bench/cache_replay.py
PARTS = ("speed", "prefill", "passkey", "ppl")
OPS_STEPS = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=["speed"])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: fp32 on CPU, bf16 on GPU")
    p.add_argument("--policies", nargs="+", default=["snapkv", "pyramidkv", "adakv", "h2o", "sink", "local"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.2, 0.1], help="ratios of the prompt")
    p.add_argument("--slack", type=int, default=None, help="tokens past the budget before evicting (default: the "
                   "library's; 0 evicts every step)")
    p.add_argument("--h2o-sinks", type=int, default=0, help="sink tokens for h2o (the sink policy uses 4)")
    p.add_argument("--score-method", default="auto", choices=["auto", "chunked", "sdpa_grad"])
    p.add_argument("--prompt-len", type=int, default=8192)
    p.add_argument("--block", type=int, default=65, help="decode steps per timed block")
    p.add_argument("--rounds", type=int, default=3, help="alternated full/policy blocks (median)")
    p.add_argument("--prefill-repeats", type=int, default=3)
    p.add_argument("--passkey-length", type=int, default=4096)
    p.add_argument("--passkey-depths", nargs="+", type=float, default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--passkey-trials", type=int, default=2, help="per depth")
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--ppl-chunk", type=int, default=128)
    p.add_argument("--ppl-source", default="python-stdlib", help="sinklora.data.corpora source (held-out split)")
    p.add_argument("--machine", default="2-core CPU, shared", help="written beside every time")
    p.add_argument("--out", default="outputs/bench_cache.json")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip them")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the merged markdown table of these files and exit")
    p.add_argument("--ruler", nargs="+", metavar="JSON", default=[],
                   help="with --table: `sinklora eval ruler` results whose per-cache averages fill the RULER column")
    return p.parse_args(argv)


def configs(args: argparse.Namespace) -> list[tuple[str, float | None]]:
    return [("full", None)] + [(p, b) for b in args.budgets for p in args.policies]


def build_cache(model, policy: str, budget: float | int | None, args: argparse.Namespace):
    sinks = args.h2o_sinks if policy == "h2o" else None
    return make_cache(model, policy, budget, sink_tokens=sinks, score_method=args.score_method,
                      slack=None if policy == "full" else args.slack)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, ids: torch.Tensor, cache) -> tuple[torch.Tensor, float]:
    """Feed the prompt; -> (the next token (1, 1), seconds)."""
    _sync(ids.device)
    t0 = time.perf_counter()
    with torch.inference_mode(), attach_cache(model, cache) as kw:
        token = model(input_ids=ids[None], logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return token, time.perf_counter() - t0


def decode(model, cache, token: torch.Tensor, steps: int, counter: OpCounter | None = None) -> tuple[torch.Tensor, float]:
    """``steps`` greedy one-token forwards (the loop ``generate`` runs, without its bookkeeping)."""
    _sync(token.device)
    t0 = time.perf_counter()
    with torch.inference_mode(), attach_cache(model, cache) as kw:
        for _ in range(steps):
            if counter is None:
                out = model(input_ids=token, logits_to_keep=1, **kw)
            else:
                with counter:
                    out = model(input_ids=token, logits_to_keep=1, **kw)
            token = out.logits[:, -1:].argmax(-1)
    _sync(token.device)
    return token, time.perf_counter() - t0


def ops_steps(cache) -> int:
    """64 decode steps, rounded up to whole eviction periods (one eviction every slack + 1 steps)."""
    period = cache.slack + 1 if cache.policy.name != "full" else 1
    return period * math.ceil(OPS_STEPS / period)


def count_ops(model, cache, token: torch.Tensor) -> dict:
    steps, counter = ops_steps(cache), OpCounter()
    decode(model, cache, token, steps, counter)
    top = counter.by_name().most_common()
    return {"ops_per_step": counter.ops / steps, "kernels_per_step": counter.kernels / steps, "ops_steps": steps,
            "ops_by_name_per_step": {name: n / steps for name, n in top}}


def speed_part(model, ids, args, done: set, emit) -> None:
    full = make_cache(model, "full")
    full_token, seconds = prefill(model, ids, full)
    full_row = {"policy": "full", "budget": None, "slack": 0, "prefill_s_runs": [seconds], "speedup": 1.0,
                "kv_bytes": full.stats()["max_kv_bytes"], "decode_tokens_per_s_runs": []}
    for policy, budget in configs(args)[1:]:
        if (policy, budget) in done:
            continue
        cache = build_cache(model, policy, budget, args)
        token, prefill_s = prefill(model, ids, cache)
        with torch.inference_mode():
            ref, ref_token = copy.deepcopy(full), full_token  # the full cache right after the same prompt
        rates, ref_rates = [], []
        for _ in range(args.rounds):
            ref_token, dt_ref = decode(model, ref, ref_token, args.block)
            token, dt = decode(model, cache, token, args.block)
            ref_rates.append(args.block / dt_ref)
            rates.append(args.block / dt)
        if "ops_per_step" not in full_row:
            full_row.update(count_ops(model, ref, ref_token))
        full_row["decode_tokens_per_s_runs"] += ref_rates
        stats = cache.stats()
        emit({"policy": policy, "budget": budget, "slack": cache.slack, "prefill_s": prefill_s,
              "decode_tokens_per_s": statistics.median(rates), "decode_tokens_per_s_runs": rates,
              "full_decode_tokens_per_s_runs": ref_rates,
              "speedup": statistics.median(r / f for r, f in zip(rates, ref_rates)),
              "kv_bytes": stats["max_kv_bytes"], "kept_tokens": stats["kept_tokens"], "split": stats["split"],
              **count_ops(model, cache, token), "full_ops_per_step": full_row["ops_per_step"]})
        emit_full(full_row, emit)  # again after every policy: a run cut short keeps its baseline
        del cache, ref
    if full_row["decode_tokens_per_s_runs"]:
        full_row["prefill_s_runs"].append(prefill(model, ids, make_cache(model, "full"))[1])
        emit_full(full_row, emit)


def emit_full(row: dict, emit) -> None:
    emit({**row, "prefill_s": statistics.mean(row["prefill_s_runs"]),
          "decode_tokens_per_s": statistics.median(row["decode_tokens_per_s_runs"])})


def prefill_part(model, ids, args, done: set, emit) -> None:
    for policy, budget in configs(args)[1:]:
        if (policy, budget) in done:
            continue
        runs, full_runs = [], []
        for _ in range(args.prefill_repeats):
            full_runs.append(prefill(model, ids, make_cache(model, "full"))[1])
            runs.append(prefill(model, ids, build_cache(model, policy, budget, args))[1])
        emit({"policy": policy, "budget": budget, "prefill_s": statistics.median(runs), "prefill_s_runs": runs,
              "full_prefill_s_runs": full_runs,
              "prefill_vs_full": statistics.median(r / f for r, f in zip(runs, full_runs))})


def passkey_part(model, tokenizer, args, rows: list, emit) -> None:
    """Every policy on the same prompts, one recorded prompt forward per trial (bench/cache_replay.py);
    the rows are rewritten after every prompt, and ``--resume`` skips the prompts every row has."""
    from cache_replay import passkey_many

    runs = {c: [] for c in configs(args)}
    for row in rows:
        if row["part"] == "passkey" and _key(row) in runs:
            runs[_key(row)] = row["passkey_runs"]
    skip = set.intersection(*({(r["depth"], r["trial"]) for r in trials} for trials in runs.values()))
    caches = {c: (lambda c=c: build_cache(model, c[0], c[1], args)) for c in runs}
    for scores in passkey_many(model, tokenizer, caches, args.passkey_length, args.passkey_depths,
                               args.passkey_trials, skip=skip):
        for (policy, budget), score in scores.items():
            trials = runs[policy, budget] = [r for r in runs[policy, budget]
                                             if (r["depth"], r["trial"]) != (score["depth"], score["trial"])] + [score]
            emit({"policy": policy, "budget": budget, "passkey_passed": sum(r["exact"] for r in trials),
                  "passkey_trials": len(trials), "passkey_length": args.passkey_length, "passkey_runs": trials})


def streaming_perplexity(model, ids: torch.Tensor, cache, chunk: int) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode(), attach_cache(model, cache) as cache_kw:
        for start in range(0, ids.numel() - 1, chunk):
            x = ids[start:start + chunk]
            target = ids[start + 1:start + 1 + x.numel()]
            logits = model(input_ids=x[None], **cache_kw).logits[0, :target.numel()].float()
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += target.numel()
    return math.exp(nll / count)


def ppl_part(model, tokenizer, args, done: set, emit) -> None:
    doc = document_ids(tokenizer, args.ppl_source, args.ppl_tokens).to(next(model.parameters()).device)
    for policy, budget in configs(args):
        if (policy, budget) in done:
            continue
        doc_budget = None if budget is None else max(1, round(budget * doc.numel()))
        emit({"policy": policy, "budget": budget,
              "ppl": streaming_perplexity(model, doc, build_cache(model, policy, doc_budget, args), args.ppl_chunk)})


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    """An n-token passkey-style prompt (filler text with one key in the middle)."""
    from sinklora.eval.passkey import build_passkey_prompt

    return build_passkey_prompt(tokenizer, n, 0.5, 12345)[1]


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


def _key(row: dict) -> tuple[str, float | None]:
    return row["policy"], row["budget"]


def ruler_averages(paths: list[str]) -> tuple[dict[tuple, float], list[str]]:
    """(policy, budget) -> RULER average over tasks and lengths, from ``sinklora eval ruler`` result files."""
    averages, notes = {}, []
    for path in paths:
        result = json.loads(Path(path).read_text())
        meta = result["metadata"]
        notes.append(f"`{Path(path).name}`: RULER, {len(result['tasks'])} tasks at {meta['lengths']} tokens, "
                     f"{meta['samples']} sample(s) each, on {meta['model_info']['device']}")
        for entry in result["summary"]:
            policy, _, budget = entry["cache"].partition("@")
            averages[policy, float(budget) if budget else None] = entry["average"]
    return averages, notes


def table(paths: list[str], ruler_paths: list[str] = ()) -> str:
    """One markdown table of every policy x budget from the parts' result files (later files win) and,
    for the RULER column, ``sinklora eval ruler`` result files."""
    rows: dict[tuple, dict] = {}
    ruler, notes = ruler_averages(list(ruler_paths))
    for path in paths:
        result = json.loads(Path(path).read_text())
        s = result["settings"]
        notes.append(f"`{Path(path).name}`: {', '.join(s['parts'])} on {s['device_name']} ({s['machine']}), {s['dtype']}")
        for row in result["rows"]:
            rows.setdefault(_key(row), {}).update(row)
    full = rows.get(("full", None), {})
    order = sorted(rows, key=lambda k: (k[0] != "full", -(k[1] or 2), k[0]))

    def ratio(row: dict, name: str, fmt: str) -> str:
        if name not in row:
            return "-"
        base = full.get(name)
        return fmt.format(row[name]) + (f" ({row[name] / base:.2f}x)" if base and row is not full else "")

    length = next((r["passkey_length"] for r in rows.values() if "passkey_length" in r), None)
    head = ["policy", "budget", "KV MiB", "ops / decode step", "decode tokens/s", "prefill s",
            f"passkey {length}" if length else "passkey", "ppl", "RULER avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in order:
        r = rows[key]
        decode = "-" if "decode_tokens_per_s" not in r else (
            f"{r['decode_tokens_per_s']:.1f}" + ("" if r is full else f" ({r['speedup']:.2f}x)"))
        prefill = ratio(r, "prefill_s", "{:.1f}")
        if "prefill_vs_full" in r:
            prefill = f"{r['prefill_s']:.1f} ({r['prefill_vs_full']:.2f}x)"
        passkey = f"{r['passkey_passed']:g}/{r['passkey_trials']}" if "passkey_passed" in r else "-"
        cells = [r["policy"], "-" if r["budget"] is None else f"{r['budget']:.0%}",
                 "-" if "kv_bytes" not in r else f"{r['kv_bytes'] / 2**20:.1f}",
                 ratio(r, "ops_per_step", "{:.0f}"), decode, prefill, passkey,
                 "-" if "ppl" not in r else f"{r['ppl']:.3f}",
                 f"{ruler[key]:.1f}" if key in ruler else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    import transformers

    from sinklora.eval.results import write_results
    from sinklora.models.loading import load_model

    args = parse_args(argv)
    if args.table:
        print(table(args.table, args.ruler))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    model.eval()
    out = Path(args.out)
    settings = {**vars(args), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
                "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    rows = json.loads(out.read_text())["rows"] if args.resume and out.is_file() else []
    part = ""

    def emit(row: dict) -> None:
        row = {"part": part, **row, "load_average_1m": os.getloadavg()[0]}  # how shared the machine was
        rows[:] = [r for r in rows if (r["part"], _key(r)) != (part, _key(row))] + [row]  # a newer row replaces
        write_results({"settings": settings, "rows": rows}, out)  # after every row: an interruption loses one
        logger.info("%s %s: %s", row["policy"], row["budget"],
                    {k: v for k, v in row.items() if not isinstance(v, (dict, list))})

    ids = prompt_ids(tokenizer, args.prompt_len).to(device)
    for part in args.parts:
        done = {_key(r) for r in rows if r["part"] == part}
        if part == "speed":
            speed_part(model, ids, args, done, emit)
        elif part == "prefill":
            prefill_part(model, ids, args, done, emit)
        elif part == "passkey":
            passkey_part(model, tokenizer, args, rows, emit)
        else:
            ppl_part(model, tokenizer, args, done, emit)
    print(table([str(out)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
