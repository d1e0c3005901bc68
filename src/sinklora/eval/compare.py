"""Full vs S2 vs SF attention: the paper's comparison as one command.

From one base model and one training budget, trains one LoRA+ adapter per attention method (``full``,
``s2``, ``sf``; optionally ``s2_roll`` and ``sf`` variants such as ``sf:sink_tokens=8``), then
evaluates the untrained base (position interpolation only) and every adapter with *full* attention
at the target length on the same held-out documents. Reports perplexity, passkey accuracy, training
time, peak memory and the perplexity improvement ratio (method.md section 2)::

    improvement_ratio(m) = (ppl_base - ppl_m) / (ppl_base - ppl_full)

The paper reports S2-Attn 39% and SF-Attn 92%. Writes compare.md, compare.json and compare.png.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sinklora.config import ConfigError, load_config, option, to_dict
from sinklora.models.loading import DEFAULT_MODEL
from sinklora.models.lora import LoraSettings
from sinklora.train.extend import EvalSettings, ExtendConfig, evaluate, resolve_preset
from sinklora.train.recipe import AttentionConfig, TrainingConfig

logger = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    model: str = option(DEFAULT_MODEL, "base model (hub id, folder, or the default alias)")
    output_dir: str = option("runs/compare", "one sub-folder per method, plus the report")
    preset: Literal["auto", "cpu-smoke", "gpu"] = option("auto", "budget defaults (see `sinklora train --help`)")
    data: str = option("books", "training documents (the held-out split is evaluated)")
    target_len: int | None = option(None, "context length to extend to")
    original_len: int | None = option(None, "pretraining context length (default: the model config's); a smaller "
                                            "value makes a proxy experiment at short lengths (CPU)")
    train_len: int | None = option(None, "tokens per training row (default: target_len)")
    methods: list[str] = option(factory=lambda: ["full", "s2", "sf"],
                                help="attention methods; a variant adds settings: sf:sink_tokens=8,shifted_head_fraction=0")
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    overwrite: bool = option(False, "retrain methods whose folder already holds a run")

    def validate(self) -> list[str]:
        errors = []
        if "full" not in [m.split(":")[0] for m in self.methods]:
            errors.append(f"methods={self.methods}: include 'full' (the improvement ratio is relative to it)")
        for m in self.methods:
            try:
                method_attention(self.attention, m)
            except (ConfigError, ValueError) as e:
                errors.append(f"methods entry {m!r}: {e}")
        if len(set(self.methods)) != len(self.methods):
            errors.append(f"methods={self.methods}: an entry appears twice")
        return errors


def method_attention(base: AttentionConfig, method: str) -> AttentionConfig:
    """``"sf:sink_tokens=8,group_ratio=0.125"`` -> AttentionConfig(pattern="sf", ...), other fields from base."""
    pattern, _, extra = method.partition(":")
    overrides = {"pattern": pattern}
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = value.strip()
    merged = {**to_dict(base), **{k: v for k, v in overrides.items()}}
    return load_config(AttentionConfig, overrides=[f"{k}={v}" for k, v in merged.items() if v is not None])


def _slug(method: str) -> str:
    return method.replace(":", "_").replace(",", "_").replace("=", "")


def improvement_ratio(ppl_base: float, ppl_method: float, ppl_full: float) -> float | None:
    gain = ppl_base - ppl_full
    return None if abs(gain) < 1e-12 else (ppl_base - ppl_method) / gain


def run(cfg: CompareConfig) -> dict:
    from sinklora.eval.results import run_metadata
    from sinklora.models.loading import load_model
    from sinklora.train import extend

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    trained = {}
    for method in cfg.methods:
        ecfg = ExtendConfig(model=cfg.model, output_dir=str(out / _slug(method)), preset=cfg.preset, data=cfg.data,
                            target_len=cfg.target_len, original_len=cfg.original_len, train_len=cfg.train_len,
                            attention=method_attention(cfg.attention, method), lora=copy.deepcopy(cfg.lora),
                            train=copy.deepcopy(cfg.train), eval=EvalSettings(enabled=False))
        done = Path(ecfg.output_dir) / "results.json"
        if done.is_file() and not cfg.overwrite:
            logger.info("%s: reusing the finished run in %s (overwrite=true retrains)", method, ecfg.output_dir)
            trained[method] = json.loads(done.read_text())
        else:
            ecfg.overwrite = Path(ecfg.output_dir).exists()
            trained[method] = extend.run(ecfg)
    budget = trained[cfg.methods[0]]["budget"]
    probe = ExtendConfig(model=cfg.model, preset=cfg.preset, data=cfg.data, target_len=cfg.target_len,
                         original_len=cfg.original_len, train_len=cfg.train_len, train=copy.deepcopy(cfg.train), eval=copy.deepcopy(cfg.eval))
    resolve_preset(probe)  # the same evaluation settings as a `sinklora train` run would use
    e = probe.eval
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else None

    def _eval(label: str, adapter: str | None) -> dict:
        model, tok = load_model(cfg.model, adapter=adapter, context_len=probe.target_len if adapter is None else None,
                                original_len=cfg.original_len if adapter is None else None, dtype=dtype, device=device)
        t0 = time.perf_counter()
        res = evaluate(model, tok, e, label)
        res["eval_seconds"] = round(time.perf_counter() - t0, 1)
        del model
        return res

    base = _eval("base (PI only)", None)
    rows.append({"method": "base (PI only)", **base, "train_seconds": None, "peak_gpu_gib": None})
    for method in cfg.methods:
        res = _eval(method, str(out / _slug(method)))
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
    from sinklora.eval.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    names = [r["method"] for r in rows]
    ax.bar(names, [r["ppl"] for r in rows], color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    for i, r in enumerate(rows):
        if r["improvement_ratio"] is not None and not r["method"].startswith("base"):
            ax.text(i, r["ppl"], f"{r['improvement_ratio']:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"perplexity @ {length} tokens (full attention)")
    ax.set_title("held-out perplexity by training attention (label: improvement ratio)")
    _save(fig, path)


CONFIG = CompareConfig


def main(cfg: CompareConfig) -> int:
    run(cfg)
    return 0
