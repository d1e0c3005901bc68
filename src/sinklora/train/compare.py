"""Full vs S2 vs SF attention: the paper's comparison as one command.

From one base model and one training budget, trains one LoRA+ adapter per attention method (``full``,
``s2``, ``sf``; optionally ``s2_roll`` and ``sf`` variants such as ``sf:sink_tokens=8``), then
evaluates the untrained base (position interpolation only) and every adapter with *full* attention
at the target length on the same held-out documents. Reports perplexity, passkey accuracy, training
time, peak memory and the perplexity improvement ratio (docs/method.md §4)::

    improvement_ratio(m) = (ppl_base - ppl_m) / (ppl_base - ppl_full)

The paper reports S2-Attn 39% and SF-Attn 92%. Writes compare.md, compare.json and compare.png.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from sinklora import runtime
from sinklora.config import to_dict
from sinklora.eval.plots import pyplot, save_figure
from sinklora.eval.results import run_metadata
from sinklora.models.loading import load_model
from sinklora.train import extend
from sinklora.train.configs import CompareConfig, ExtendConfig, method_attention

logger = logging.getLogger(__name__)


def method_dir(cfg: CompareConfig, method: str) -> Path:
    """The run folder of one method, named by its pattern's key (``sf``, ``sf-s8``, ...)."""
    return Path(cfg.output_dir) / method_attention(cfg.attention, method).build().key


def improvement_ratio(ppl_base: float, ppl_method: float, ppl_full: float) -> float | None:
    gain = ppl_base - ppl_full
    return None if abs(gain) < 1e-12 else (ppl_base - ppl_method) / gain


def run(cfg: CompareConfig) -> dict:
    from sinklora.models.loading import load_tokenizer

    probe = cfg.extension("full", cfg.output_dir)
    extend.resolve_preset(probe)  # the same evaluation settings as a `sinklora train` run would use
    e = probe.eval
    # the held-out documents are read and checked before any training (each method's run checks its data)
    eval_data = extend.eval_documents(e, load_tokenizer(cfg.model), cfg.on_error)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    trained = {}
    for method in cfg.methods:
        ecfg = cfg.extension(method, str(method_dir(cfg, method)))
        ecfg.eval.enabled = False  # every method is evaluated below, on the same documents
        done = Path(ecfg.output_dir) / "results.json"
        if done.is_file() and not cfg.overwrite:
            logger.info("%s: reusing the finished run in %s (overwrite=true retrains)", method, ecfg.output_dir)
            trained[method] = json.loads(done.read_text())
        else:
            ecfg.overwrite = Path(ecfg.output_dir).exists()
            trained[method] = extend.run(ecfg)
    budget = trained[cfg.methods[0]]["budget"]
    dtype = "bfloat16" if runtime.use_bf16("auto") else "float32"

    def _eval(label: str, adapter: str | None) -> dict:
        extension = {} if adapter is not None else {"context_len": probe.target_len, "original_len": cfg.original_len,
                                                     "rope_rounding": cfg.rope_rounding}
        model, tok = load_model(cfg.model, adapter=adapter, dtype=dtype, device="auto", **extension)
        t0 = time.perf_counter()
        res = extend.evaluate(model, tok, e, label, eval_data)
        res["eval_seconds"] = round(time.perf_counter() - t0, 1)
        del model
        return res

    base = _eval("base (PI only)", None)
    rows.append({"method": "base (PI only)", **base, "train_seconds": None, "peak_gpu_gib": None})
    for method in cfg.methods:
        res = _eval(method, str(method_dir(cfg, method)))
        summary = trained[method]["train"]
        rows.append({"method": method, **res, "train_seconds": summary["train_seconds"],
                     "peak_gpu_gib": summary["peak_gpu_gib"], "last_loss": summary["last_loss"],
                     "tokens_per_s": summary["tokens_per_s"]})
    ppl_full = next(r["ppl"] for r in rows if r["method"] == "full")
    for r in rows:
        r["improvement_ratio"] = improvement_ratio(base["ppl"], r["ppl"], ppl_full)
    report = {"meta": run_metadata(model=cfg.model, lengths=[e.length], seeds=[cfg.train.seed, e.seed],
                                   target_len=probe.target_len, methods=cfg.methods),
              "config": to_dict(cfg), "budget": budget, "rows": rows}
    (out / "compare.json").write_text(json.dumps(report, indent=1, default=str))
    table = compare_table(rows, budget, probe)
    (out / "compare.md").write_text(table + "\n")
    _plot(rows, out / "compare.png", e.length)
    print("\n" + table + f"\n\nreport: {out}/compare.md, compare.json, compare.png")
    return report


def compare_table(rows: list[dict], budget: dict, probe: ExtendConfig) -> str:
    lines = [f"## full vs S2 vs SF attention: {probe.model}, {budget.get('original_len')} -> {probe.target_len} tokens, "
             f"{probe.train.max_steps} steps of {probe.train_len} tokens (preset {budget.get('preset')})",
             "", f"Evaluated with full attention at {rows[0]['length']} tokens on the same held-out documents.", "",
             "| method | perplexity | improvement ratio | passkey | train time (s) | tokens/s | peak GPU GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["improvement_ratio"] is None or r["method"].startswith("base") else f"{r['improvement_ratio']:.0%}"
        fmt = lambda v: "" if v is None else v  # noqa: E731
        lines.append(f"| {r['method']} | {r['ppl']:.3f} | {ratio} | {r['passkey_accuracy']:.0%} of {r['passkey_trials']} "
                     f"| {fmt(r['train_seconds'])} | {fmt(r.get('tokens_per_s'))} | {fmt(r['peak_gpu_gib'])} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, length: int) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    names = [r["method"] for r in rows]
    ax.bar(names, [r["ppl"] for r in rows], color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    for i, r in enumerate(rows):
        if r["improvement_ratio"] is not None and not r["method"].startswith("base"):
            ax.text(i, r["ppl"], f"{r['improvement_ratio']:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"perplexity @ {length} tokens (full attention)")
    ax.set_title("held-out perplexity by training attention (label: improvement ratio)")
    save_figure(fig, path)
