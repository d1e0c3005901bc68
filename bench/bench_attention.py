"""Attention op benchmark: forward+backward time and peak memory of sparse patterns vs dense causal SDPA.

CPU (each measurement in a fresh subprocess, peak RSS growth = memory):
    python bench/bench_attention.py --device cpu --lengths 4096 8192 16384 --heads 9 --kv-heads 3 --head-dim 64
GPU (one process, CUDA events, torch.cuda.max_memory_allocated):
    python bench/bench_attention.py --device cuda --lengths 32768 16384 8192 --heads 32 --kv-heads 8 --head-dim 128 \
        --impls sdpa_causal sf_fused sf_flex s2_fused s2_flex

Implementations: ``sdpa_causal`` (PyTorch's fused causal attention, the baseline); ``sf`` / ``s2``
on the device's default backend (the rule of ``sinklora.attention.backends``), or ``sf_<backend>`` /
``s2_<backend>`` on a named one (``grouped``, ``fused``, ``flex``); ``dense_masked`` (one masked
softmax over the dense pattern, the reference; O(N^2) memory). The first call of each point is a warm-up (Flex compiles there; its time is
``warmup_ms``). ``--interleave`` times every impl in one process, taking turns step by step (ratios
that hold on a shared machine; medians of --repeats). Rows go to --out as they are measured (a run cut short keeps them) and a markdown
table is printed at the end, with, per length and pattern, which backend was faster (the data of the
CUDA rule).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

PATTERNS = ("sf", "s2")
BACKEND_NAMES = ("grouped", "fused", "flex")
IMPLS = ("sdpa_causal", "dense_masked") + PATTERNS + tuple(f"{p}_{b}" for p in PATTERNS for b in BACKEND_NAMES)


def _op(impl: str, ratio: float, key_padding_mask: torch.Tensor | None = None, doc_lengths=None):
    from sinklora.attention import build_mask, sparse_attention
    from sinklora.attention.reference import dense_attention

    if impl == "sdpa_causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    if impl == "dense_masked":
        cache = {}

        def dense(q, k, v):
            n = q.shape[2]
            if n not in cache:
                cache[n] = build_mask("sf", n, q.shape[1], device=q.device, group_ratio=ratio)
            return dense_attention(q, k, v, cache[n], upcast=False)

        return dense
    pattern, _, backend = impl.partition("_")
    if pattern in PATTERNS and (not backend or backend in BACKEND_NAMES):
        return lambda q, k, v: sparse_attention(q, k, v, pattern, group_ratio=ratio, backend=backend or None,
                                                key_padding_mask=key_padding_mask, doc_lengths=doc_lengths)
    raise ValueError(f"impl={impl!r}: choose from {IMPLS}")


def _step(impl: str, n: int, args):
    """One forward + backward of ``impl`` on fixed random inputs."""
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    B = 2 if args.padded else 1
    q = torch.randn(B, args.heads, n, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, args.kv_heads, n, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, args.kv_heads, n, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
    do = torch.randn(B, args.heads, n, args.head_dim, device=dev, dtype=dtype)
    kpm = None
    if args.padded:  # the second row right-padded by a quarter, as the SFT collator pads
        kpm = torch.ones(B, n, dtype=torch.bool, device=dev)
        kpm[1, n * 3 // 4:] = False
    docs = (n // 8, n * 3 // 8, n // 4, n - n * 3 // 4) if args.packed else None  # four documents in the row
    op = _op(impl, args.ratio, kpm, docs)

    def step():
        out = op(q, k, v)
        out.backward(do)
        q.grad = k.grad = v.grad = None

    return step


def interleaved(n: int, args) -> list[dict]:
    """Every impl in one process, taking turns step by step, so a shared machine's load hits them alike:
    the median per impl and its ratio to the first impl."""
    steps = {impl: _step(impl, n, args) for impl in args.impls}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(args.repeats):
        for impl, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[impl].append((time.perf_counter() - t0) * 1000)
    first = statistics.median(times[args.impls[0]])
    return [{"impl": impl, "n": n, "ms": round(statistics.median(ts), 2), "runs_ms": [round(t) for t in ts],
             f"ratio_vs_{args.impls[0]}": round(first / statistics.median(ts), 2), "device": _device_name(
                 torch.device(args.device)), "mode": "interleaved"} for impl, ts in times.items()]


def measure(impl: str, n: int, args) -> dict:
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    step = _step(impl, n, args)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compiles FlexAttention on CUDA
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    warmup_ms = (time.perf_counter() - t0) * 1000
    if dev.type == "cuda":
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
    return {"impl": impl, "n": n, "ms": round(ms, 2), "warmup_ms": round(warmup_ms), "peak_mib": round(peak / 2**20, 1), "device": _device_name(dev),
            "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "ratio": args.ratio,
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu x{torch.get_num_threads()} threads"


def _table(rows: list[dict]) -> str:
    base = {r["n"]: r["ms"] for r in rows if r["impl"] == "sdpa_causal" and "ms" in r}
    lines = ["| N | impl | fwd+bwd ms | speed-up vs sdpa_causal | warm-up ms | peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['impl']} | {r['error']} | | | |")
            continue
        ratio = f"{base[r['n']] / r['ms']:.2f}x" if r["n"] in base else ""
        lines.append(f"| {r['n']} | {r['impl']} | {r['ms']} | {ratio} | {r.get('warmup_ms', '')} | {r['peak_mib']} |")
    lines += ["", "| N | pattern | faster backend (the CUDA rule's data) |", "|---|---|---|"]
    for n in dict.fromkeys(r["n"] for r in rows):
        for pattern in PATTERNS:
            timed = {r["impl"].partition("_")[2]: r["ms"] for r in rows
                     if r["n"] == n and r["impl"].startswith(pattern + "_") and "ms" in r}
            if len(timed) > 1:
                best = min(timed, key=timed.get)
                others = ", ".join(f"{b} {ms} ms" for b, ms in timed.items())
                lines.append(f"| {n} | {pattern} | {best} ({others}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--impls", nargs="+", default=["sdpa_causal", "sf", "s2", "dense_masked"], choices=IMPLS)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-dense-n", type=int, default=8192, help="skip dense_masked above this N (O(N^2) memory)")
    p.add_argument("--padded", action="store_true",
                   help="two rows, the second right-padded by a quarter (sparse impls only; SDPA ignores it)")
    p.add_argument("--packed", action="store_true", help="four packed documents per row (sparse impls only)")
    p.add_argument("--interleave", action="store_true",
                   help="all impls in one process taking turns (ratios on a shared machine; no memory figures)")
    p.add_argument("--out", default=None)
    p.add_argument("--single", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print(json.dumps(measure(args.single[0], int(args.single[1]), args)))
        return
    rows = []
    if args.interleave:
        for n in args.lengths:
            for row in interleaved(n, args):
                print(json.dumps(row), flush=True)
                rows.append(row)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return
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
            if args.out:  # written as they come: a run cut by its time limit keeps what it measured
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
    print(_table(rows))


if __name__ == "__main__":
    main()
