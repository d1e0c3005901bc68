"""`sinklora serve` under N concurrent streaming clients on loopback: time to first token and tokens/s,
full KV cache vs a compressed one (default: snapkv at 20% of the prompt), in one server run.

Starts ``sinklora serve`` (the default model unless ``--model``) on 127.0.0.1 with a free port, then for
each round and each cache setting (alternated, so load on a shared machine hits both alike) sends
``--clients`` chat requests at once, each a distinct ``--prompt-tokens``-token document plus a question,
streamed (``stream_options.include_usage``), and records per request:
- time to first token (TTFT): request sent -> first content chunk; the server runs one request at a
  time, so TTFT includes the wait behind the requests ahead (p95 ~ clients x request time);
- tokens/s per stream: (completion tokens - 1) / (last chunk - first chunk);
- total tokens/s: all completion tokens of the round / the round's wall time;
- the server's cache stats (kept / seen tokens, KV MiB) from the last chunk.
Every request has a timeout and the number of requests is fixed (rounds x settings x clients).

CPU (~10 min on 2 shared cores): python bench/bench_serve.py --clients 4 --rounds 2 --threads 1
Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, default=4, help="concurrent streaming clients per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds per cache setting (settings alternate)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="approximate document length per request")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--policy", default="snapkv", help="the compressed cache's policy")
    p.add_argument("--budget", default="0.2", help="its budget (a ratio of the prompt, or tokens)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request, queueing included")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the server (OMP_NUM_THREADS); 1 on a shared CPU, where 2 threads ran "
                        "4-5x slower (their OpenMP barriers wait on a descheduled partner)")
    p.add_argument("--out", default="outputs/bench_serve")
    return p.parse_args(argv)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "sinklora.cli", "serve", f"model={args.model}", f"device={args.device}", "port=0",
           f"max_queue={args.clients}", f"request_timeout={args.timeout}", f"max_new_tokens={args.max_tokens}"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 5)
        line = proc.stdout.readline() if ready else ""
        print(line, end="", file=sys.stderr)
        match = re.search(r"sinklora serve: (http://[^/\s]+)/", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain its log
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError("the server did not start")


def document(i: int, tokens: int) -> str:
    """A distinct, deterministic document of about ``tokens`` tokens (~5 per sentence)."""
    facts = [f"Station {i}-{k} logged {(k * 37 + i * 11) % 97} crates of {('tea', 'salt', 'iron', 'wool')[k % 4]}."
             for k in range(tokens // 12)]
    return " ".join(facts)


def stream_one(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    if res.status != 200:
        return {"status": res.status, "error": res.read().decode()[:200]}
    first = last = None
    usage, server = None, None
    for raw in res:  # one SSE line at a time
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return {"status": 200, "error": chunk["error"]["message"]}
        usage = chunk.get("usage") or usage
        server = chunk.get("sinklora") or server
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            last = time.perf_counter()
            first = first or last
    conn.close()
    n = usage["completion_tokens"]
    return {"status": 200, "ttft_s": first - sent if first else None, "completion_tokens": n,
            "prompt_tokens": usage["prompt_tokens"],
            "stream_tokens_per_s": (n - 1) / (last - first) if first and last and last > first and n > 1 else None,
            "kept_tokens": server["cache"]["kept_tokens"], "seen_tokens": server["cache"]["seen_tokens"],
            "kv_mib": server["cache"]["kv_bytes"] / 2**20, "done_s": time.perf_counter() - sent}


def run_round(url: str, args: argparse.Namespace, cache: dict[str, Any], round_idx: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = [{} for _ in range(args.clients)]

    def client(i: int) -> None:
        doc = document(round_idx * args.clients + i, args.prompt_tokens)
        body = {"messages": [{"role": "user", "content": f"{doc}\n\nWhich station logged the most crates? Explain."}],
                "stream": True, "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens,
                "temperature": 0, **cache}
        try:
            results[i] = stream_one(url, body, args.timeout)
        except Exception as e:  # recorded, not raised: the round still ends
            results[i] = {"status": None, "error": repr(e)}

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.timeout + 30)
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.get("status") == 200 and "error" not in r]
    return {"wall_s": wall, "requests": results, "ok": len(ok),
            "total_tokens_per_s": sum(r["completion_tokens"] for r in ok) / wall if ok else None}


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(label: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    reqs = [r for rd in rounds for r in rd["requests"] if r.get("status") == 200 and "error" not in r]
    failed = sum(len(rd["requests"]) for rd in rounds) - len(reqs)
    return {"cache": label, "requests": len(reqs), "failed": failed,
            "ttft_p50_s": percentile([r["ttft_s"] for r in reqs], 0.5),
            "ttft_p95_s": percentile([r["ttft_s"] for r in reqs], 0.95),
            "stream_tokens_per_s_p50": percentile([r["stream_tokens_per_s"] for r in reqs], 0.5),
            "total_tokens_per_s": statistics.mean(rd["total_tokens_per_s"] for rd in rounds if rd["total_tokens_per_s"]),
            "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in reqs),
            "completion_tokens_mean": statistics.mean(r["completion_tokens"] for r in reqs),
            "kept_of_seen": f"{statistics.mean(r['kept_tokens'] for r in reqs):.0f} / "
                            f"{statistics.mean(r['seen_tokens'] for r in reqs):.0f}",
            "kv_mib_mean": statistics.mean(r["kv_mib"] for r in reqs)}


def to_markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def f(v: Any, d: int = 2) -> str:
        return "-" if v is None else f"{v:.{d}f}" if isinstance(v, float) else str(v)

    lines = [f"{args.clients} concurrent streaming clients x {args.rounds} rounds, ~{args.prompt_tokens}-token prompts, "
             f"max_tokens={args.max_tokens}, model {args.model} on {args.device}"
             + (f", {args.threads} torch thread(s)" if args.threads else ""), "",
             "| cache | requests (failed) | prompt / reply tokens (mean) | TTFT p50 s | TTFT p95 s | "
             "tokens/s per stream (p50) | total tokens/s | KV kept / seen tokens | KV MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['requests']} ({r['failed']}) | {r['prompt_tokens_mean']:.0f} / "
                     f"{r['completion_tokens_mean']:.1f} | {f(r['ttft_p50_s'])} | {f(r['ttft_p95_s'])} | "
                     f"{f(r['stream_tokens_per_s_p50'], 1)} | {f(r['total_tokens_per_s'], 1)} | {r['kept_of_seen']} | "
                     f"{f(r['kv_mib_mean'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the server (finally below)
    settings = {"full": {"cache": "full"}, f"{args.policy} {args.budget}": {"cache": args.policy, "budget": args.budget}}
    proc, url = start_server(args)
    try:
        stream_one(url, {"messages": [{"role": "user", "content": "warm up"}], "stream": True, "max_tokens": 4,
                         "stream_options": {"include_usage": True}}, args.timeout)
        rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in settings}
        for i in range(args.rounds):
            for label, cache in settings.items():  # alternated
                rd = run_round(url, args, cache, i)
                rounds[label].append(rd)
                print(f"round {i} {label}: {rd['ok']}/{args.clients} ok in {rd['wall_s']:.1f} s", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rows = [summarize(label, rds) for label, rds in rounds.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps({"args": vars(args), "summary": rows, "rounds": rounds}, indent=1)),
                       ("results.md", to_markdown(rows, args))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)  # atomic: a reader never sees half a file
    print(to_markdown(rows, args))
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
