"""Attention op benchmark: forward+backward time and peak memory of sparse patterns vs dense causal SDPA.

CPU (each measurement in a fresh subprocess, peak RSS growth = memory):
    python bench/bench_attention.py --device cpu --lengths 4096 8192 16384 --heads 9 --kv-heads 3 --head-dim 64
GPU (one process, CUDA events, torch.cuda.max_memory_allocated):
    python bench/bench_attention.py --device cuda --lengths 8192 16384 32768 --heads 32 --kv-heads 8 --head-dim 128

Implementations: ``sdpa_causal`` (PyTorch's fused causal attention, the baseline), ``sf`` / ``s2``
(sinklora's backend for the device: grouped on CPU, FlexAttention on CUDA) and ``dense_masked``
(one masked softmax over the dense pattern, the reference; O(N^2) memory).
Writes a JSON list of rows to --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

IMPLS = ("sdpa_causal", "sf", "s2", "dense_masked")


def _op(impl: str, ratio: float):
    from sinklora.attention import sparse_attention
    from sinklora.attention.reference import dense_attention
    from sinklora.attention import build_mask

    if impl == "sdpa_causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    if impl in ("sf", "s2"):
        return lambda q, k, v: sparse_attention(q, k, v, impl, group_ratio=ratio)
    if impl == "dense_masked":
        cache = {}

        def dense(q, k, v):
            n = q.shape[2]
            if n not in cache:
                cache[n] = build_mask("sf", n, q.shape[1], device=q.device, group_ratio=ratio)
            return dense_attention(q, k, v, cache[n], upcast=False)

        return dense
    raise ValueError(f"impl={impl!r}: choose from {IMPLS}")


def measure(impl: str, n: int, args) -> dict:
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    q = torch.randn(1, args.heads, n, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(1, args.kv_heads, n, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(1, args.kv_heads, n, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
    do = torch.randn(1, args.heads, n, args.head_dim, device=dev, dtype=dtype)
    op = _op(impl, args.ratio)

    def step():
        out = op(q, k, v)
        out.backward(do)
        q.grad = k.grad = v.grad = None

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):  # compiles FlexAttention on CUDA
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.repeats):
            step()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.repeats
        peak = torch.cuda.max_memory_allocated() - base
    else:
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            step()
        ms = (time.perf_counter() - t0) * 1000 / args.repeats
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024  # ru_maxrss is KiB on Linux
    return {"impl": impl, "n": n, "ms": round(ms, 2), "peak_mib": round(peak / 2**20, 1), "device": _device_name(dev),
            "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "ratio": args.ratio,
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu x{torch.get_num_threads()} threads"


def _table(rows: list[dict]) -> str:
    base = {r["n"]: r["ms"] for r in rows if r["impl"] == "sdpa_causal" and "ms" in r}
    lines = ["| N | impl | fwd+bwd ms | speed-up vs sdpa_causal | peak MiB |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['impl']} | {r['error']} | | |")
            continue
        ratio = f"{base[r['n']] / r['ms']:.2f}x" if r["n"] in base else ""
        lines.append(f"| {r['n']} | {r['impl']} | {r['ms']} | {ratio} | {r['peak_mib']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-dense-n", type=int, default=8192, help="skip dense_masked above this N (O(N^2) memory)")
    p.add_argument("--out", default=None)
    p.add_argument("--single", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print(json.dumps(measure(args.single[0], int(args.single[1]), args)))
        return
    rows = []
    for n in args.lengths:
        for impl in args.impls:
            if impl == "dense_masked" and n > args.max_dense_n:
                rows.append({"impl": impl, "n": n, "error": f"skipped: needs ~{3 * args.heads * n * n * 4 / 2**30:.0f} GiB"})
                continue
            if args.device == "cpu":  # a fresh process per point, so peak RSS belongs to this point alone
                cmd = [sys.executable, __file__, "--single", impl, str(n)] + [
                    a for a in sys.argv[1:] if a not in ("--single",)
                ]
                res = subprocess.run(cmd, capture_output=True, text=True)
                row = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {
                    "impl": impl, "n": n, "error": f"failed: {res.stderr.strip().splitlines()[-1][:80]}"}
            else:
                try:
                    row = measure(impl, n, args)
                except torch.OutOfMemoryError:
                    row = {"impl": impl, "n": n, "error": "out of memory"}
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
