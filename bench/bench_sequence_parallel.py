"""Sequence parallelism (DeepSpeed Ulysses, ``train.sequence_parallel=N``) on CPU: memory per rank against
sequence length for N = 1 and 2, and the bytes its all-to-alls move, counted and from the shapes.

    python bench/bench_sequence_parallel.py --lengths 1024 2048 4096 8192 --out bench/results/cpu_sequence_parallel.json
    python bench/bench_sequence_parallel.py --paper      # the Llama-2-7B / 128k / 8-GPU estimate on paper only

Each (N, length) is a fresh run of the training recipe (``make_trainer`` + ``training_attention``: N = 1 a
plain process, N = 2 two processes under torchrun on gloo with ZeRO-2) on a random-initialised Llama
(``--hidden 256 --layers 2 --heads 8 --kv-heads 2 --vocab 1024``), LoRA+, ``sf`` attention with groups of
L/4, activation checkpointing, fp32, one row per step. Per rank it records:

- ``peak_mib``: growth of the resident set over the first training step (the kernel's high-water mark,
  reset through /proc/self/clear_refs just before the step, minus the resident set then);
- ``a2a_counted``: bytes handed to DeepSpeed's all-to-all op during the second step, summed over every call
  the profiler records (``torch.profiler``, input shapes: forward, recomputation and backward);
- ``a2a_formula``: the same from the shapes (:func:`sinklora.hf.sequence_parallel.all_to_all_elements`).

``--paper`` prints the time the all-to-alls would take next to the attention compute for a Llama-2-7B shape
at 128k tokens on 8 GPUs over NVLink: an estimate on paper from the formula above and the stated
bandwidth and throughput assumptions, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALL_TO_ALL_OP = "deepspeed::dim_zero_all_to_all"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _probe(out: Path, elem_bytes: int):
    import torch
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self):
            self.rss0, self.prof, self.row = 0, None, {}

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 0:
                Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident set
                self.rss0 = _rss_kib("VmRSS")
            elif state.global_step == 1:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                self.row["peak_mib"] = round((_rss_kib("VmHWM") - self.rss0) / 1024, 1)
            elif state.global_step == 2:
                self.prof.__exit__(None, None, None)
                calls = [e for e in self.prof.events() if e.name == ALL_TO_ALL_OP]
                numel = sum(_numel(e.input_shapes[0]) for e in calls)
                self.row.update(a2a_calls=len(calls), a2a_counted=numel * elem_bytes)
                out.write_text(json.dumps(self.row))

    return Probe()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def worker(args) -> None:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from sinklora import runtime
    from sinklora.attention import Pattern
    from sinklora.hf.sequence_parallel import all_to_all_elements, training_attention
    from sinklora.models.lora import LoraSettings, apply_lora_plus
    from sinklora.settings import TrainingConfig
    from sinklora.train.recipe import make_trainer

    n, length = args.sp, args.length
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=length, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    model.config.use_cache = False
    model = apply_lora_plus(model, LoraSettings())
    # the recipe only reads the pad id (and would save the tokenizer): a one-word vocabulary is enough
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                        pad_token="<pad>")
    rows = torch.randint(1, args.vocab, (4, length))
    data = [{"input_ids": r, "labels": r} for r in rows]
    tc = TrainingConfig(max_steps=2, learning_rate=1e-4, warmup_steps=0, save_steps=100, sequence_parallel=n,
                        deepspeed=str(REPO / "configs/deepspeed/zero2.json") if n > 1 else None)
    out = Path(args.worker_out) / f"rank{runtime.rank()}.json"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(model, tokenizer, data, tc, Path(tmp), tokens_per_row=length,
                               callbacks=[_probe(out, elem_bytes=4)])
        with training_attention(model, Pattern(args.pattern, group_ratio=0.25), n):
            trainer.train()
    row = json.loads(out.read_text())
    row.update(sp=n, length=length, rank=runtime.rank(),
               a2a_formula=all_to_all_elements(config, length, n) * 4)
    out.write_text(json.dumps(row))


def run_one(args, n: int, length: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        me = [str(Path(__file__).resolve()), "--worker", "--worker-out", tmp, "--sp", str(n), "--length", str(length),
              "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads", str(args.heads),
              "--kv-heads", str(args.kv_heads), "--vocab", str(args.vocab), "--pattern", args.pattern]
        launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 str(n), "--master_port", str(29600 + length % 997)]
        # a fixed mmap threshold: with glibc's adaptive one, large tensors move to the heap after the first
        # frees, where fragmentation inflates the resident set (measured: 350 vs 190 MiB at N=1, L=4096)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536",
               "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(launch + me, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"N={n} L={length} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]


# The sf op measured on one H100 (BENCHMARKS.md, bench_attention.py): forward + backward, bf16, 32 heads of 128,
# 16384 tokens, groups of L/4: 7.98 ms
H100_SF_MS, H100_SF_LEN, H100_SF_HEADS = 7.98, 16384, 32


def paper_estimate(length: int = 131072, n: int = 8, links_gbs: tuple[float, ...] = (450.0, 300.0),
                   attn_tflops: float = 400.0) -> str:
    """Llama-2-7B (32 layers, 32 heads of 128, MHA), bf16, activation checkpointing, one row of ``length``
    tokens on ``n`` GPUs: the all-to-all time next to the attention compute. An estimate on paper."""
    from transformers import LlamaConfig

    from sinklora.hf.sequence_parallel import all_to_all_elements

    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    moved = all_to_all_elements(cfg, length, n) * 2 * (n - 1) / n  # bf16 bytes leaving one GPU per step
    # attention FLOPs per GPU (H/n heads, whole sequence): a causal forward is 2 L^2 D per head (QK^T and PV
    # over half the matrix); backward 2 forwards, recomputation 1: 4 forwards. sf: groups of L/4 -> 1/4.
    full = 4 * 2 * length**2 * 128 * (32 // n) * 32
    sf_by_flops = full / 4 / (attn_tflops * 1e12)
    # the same from the measured H100 op: time ~ L * G ~ L^2 and ~ heads; recomputation adds a forward (1/3)
    sf_by_h100 = H100_SF_MS / 1e3 * (length / H100_SF_LEN) ** 2 * (32 // n) / H100_SF_HEADS * 4 / 3 * 32
    lines = [f"ESTIMATE ON PAPER (not a measurement): Llama-2-7B shape, one row of {length} tokens on {n} GPUs "
             "(Ulysses), bf16, activation checkpointing",
             f"all-to-all bytes leaving each GPU per step: {moved / 1e9:.1f} GB (formula verified against counted CPU runs)"]
    lines += [f"  at an assumed {bw:g} GB/s per GPU and direction: {moved / (bw * 1e9):.2f} s" for bw in links_gbs]
    lines += [f"attention compute per GPU ({32 // n} heads x {length} tokens), full: {full / 1e15:.2f} PFLOP = "
              f"{full / (attn_tflops * 1e12):.2f} s at an assumed {attn_tflops:g} TFLOP/s",
              f"  sf (groups of L/4): {sf_by_flops:.2f} s at {attn_tflops:g} TFLOP/s; {sf_by_h100:.2f} s scaled from the "
              f"measured H100 sf op ({H100_SF_MS} ms, {H100_SF_HEADS} heads, {H100_SF_LEN} tokens)"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--pattern", default="sf")
    p.add_argument("--out", default="bench/results/cpu_sequence_parallel.json")
    p.add_argument("--paper", action="store_true", help="print only the estimate on paper")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--sp", type=int, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.paper:
        print(paper_estimate())
        return
    rows = []
    for length in args.lengths:
        for n in args.sizes:
            ranks = run_one(args, n, length)
            row = {"sp": n, "length": length, "pattern": args.pattern, "peak_mib_ranks": [r["peak_mib"] for r in ranks],
                   "peak_mib_per_rank": max(r["peak_mib"] for r in ranks),
                   "a2a_calls": ranks[0]["a2a_calls"], "a2a_counted": ranks[0]["a2a_counted"],
                   "a2a_formula": ranks[0]["a2a_formula"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\npattern {args.pattern}\n| L | N | peak MiB, each rank | ratio (max rank) / N=1 | all-to-all calls "
          "| bytes counted | bytes from shapes |")
    print("|---|---|---|---|---|---|---|")
    base = {r["length"]: r["peak_mib_per_rank"] for r in rows if r["sp"] == 1}
    for r in rows:
        ratio = f"{r['peak_mib_per_rank'] / base[r['length']]:.2f}" if r["sp"] > 1 and r["length"] in base else ""
        print(f"| {r['length']} | {r['sp']} | {' / '.join(map(str, r['peak_mib_ranks']))} | {ratio} | {r['a2a_calls']} | "
              f"{r['a2a_counted']:,} | {r['a2a_formula']:,} |")
    print("\n" + paper_estimate())


if __name__ == "__main__":
    main()
