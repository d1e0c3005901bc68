"""LongBench / LongBench-E from local JSONL files, with LongBench's prompts, truncation and metrics, per KV cache.

Reads {dataset}.jsonl (or {dataset}_e.jsonl with e=true) from `data` (LongBench's data.zip unpacked) or
hf:THUDM/LongBench where a hub is reachable; truncates each prompt in the middle to max_length tokens,
answers greedily with LongBench's answer lengths under each cache setting and scores each dataset with its
LongBench metric (see sinklora.eval.metrics). Writes results.json, longbench.md (datasets, categories,
average, score vs compression), longbench.png, predictions/<cache>/<dataset>.jsonl (LongBench's pred
format: its own eval.py reads them) and config.yaml to output_dir.

    sinklora eval longbench data=~/LongBench/data datasets=qasper,hotpotqa limit=20
    sinklora eval longbench data=~/LongBench/data e=true caches=full,h2o:0.2,snapkv:0.2
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sinklora.commands.options import SuiteCacheOptions, SuiteModelOptions
from sinklora.config import option


@dataclass
class LongBenchConfig(SuiteCacheOptions, SuiteModelOptions):  # fields: model options first, then cache
    output_dir: str = option("outputs/eval/longbench", "folder for results.json, longbench.md, predictions/")
    data: str = option("data/longbench", "folder of LongBench JSONL files ({dataset}.jsonl, {dataset}_e.jsonl), "
                       "or hf:THUDM/LongBench (needs a reachable hub and `datasets`)")
    datasets: list[str] = option(help="datasets to run (default: every one of the version that data holds)",
                                 factory=list)
    e: bool = option(False, "LongBench-E: the *_e files, scores also by length bucket (0-4k, 4-8k, 8k+)")
    max_length: int | None = option(None, "prompt tokens kept by middle truncation (LongBench's model2maxlen); "
                                    "default: the model's max_position_embeddings - 512")
    limit: int | None = option(None, "first N records of each dataset only (quick runs)")

    def validate(self) -> list[str]:
        from sinklora.eval.longbench import DATASETS, E_DATASETS

        errors = SuiteModelOptions.validate(self) + SuiteCacheOptions.validate(self)
        if not self.data.startswith("hf:") and not Path(self.data).expanduser().is_dir():
            errors.append(f"data={self.data!r}: no such folder; unpack LongBench's data.zip and point data at it, "
                          "or give hf:THUDM/LongBench")
        allowed = E_DATASETS if self.e else list(DATASETS)
        bad = [d for d in self.datasets if d not in allowed]
        if bad:
            version = "LongBench-E" if self.e else "LongBench"
            errors.append(f"datasets={self.datasets}: {', '.join(map(repr, bad))} not in {version}; "
                          f"choose from {', '.join(allowed)}")
        if self.max_length is not None and self.max_length < 16:
            errors.append(f"max_length={self.max_length}: must be >= 16 tokens, or omit it")
        if self.limit is not None and self.limit < 1:
            errors.append(f"limit={self.limit}: must be >= 1, or omit it")
        return errors


CONFIG = LongBenchConfig


def main(cfg: LongBenchConfig) -> int:
    import time

    from sinklora.config import save_config
    from sinklora.eval import longbench as lb
    from sinklora.eval.metrics import code_sim_backend
    from sinklora.eval.results import run_metadata, write_results
    from sinklora.eval.suite_report import plot_heatmaps, write_jsonl

    out = Path(cfg.output_dir)
    names = cfg.datasets or lb.available_datasets(cfg.data, cfg.e)
    if not names:
        raise FileNotFoundError(f"data={cfg.data!r} holds no LongBench{'-E' if cfg.e else ''} files "
                                f"({'{dataset}_e.jsonl' if cfg.e else '{dataset}.jsonl'}); unpack data.zip there")
    data = {d: lb.load_records(cfg.data, d, cfg.e, cfg.limit) for d in names}  # all read before the model loads
    settings = cfg.cache_settings()
    model, tokenizer = cfg.load()
    max_length = cfg.max_length or int(model.config.max_position_embeddings) - 512
    if max_length < 16:
        raise ValueError(f"max_length={max_length} (max_position_embeddings - 512) is too small; set max_length")
    chat = cfg.use_chat(tokenizer)
    t0, label, rows = time.perf_counter(), cfg.run_label(), []
    save_config(cfg, out / "config.yaml")
    for k, setting in enumerate(settings):  # results are rewritten after each setting: a run cut short keeps them
        rows += lb.run_longbench(model, tokenizer, data, [setting], max_length, chat)
        done = settings[:k + 1]
        summary = lb.summarize(rows, names, [s.name for s in done], cfg.e)
        payload = {
            "kind": "longbench-e" if cfg.e else "longbench", "label": label,
            "metadata": run_metadata(model=cfg.model, adapter=cfg.adapter, loaded_model=model,
                                     caches=[s.__dict__ for s in done], data=cfg.data, datasets=names,
                                     records={d: len(r) for d, r in data.items()}, limit=cfg.limit,
                                     max_length=max_length, chat_template=chat, code_sim_backend=code_sim_backend(),
                                     wall_seconds=round(time.perf_counter() - t0, 2)),
            "scoring": "LongBench metrics.py per dataset; best over answers; mean x 100; average = mean of categories",
            "datasets": names, "summary": summary,
        }
        write_results(payload, out / "results.json")
        for d in names:
            write_jsonl([{f: r[f] for f in ("pred", "answers", "all_classes", "length", "_id")}
                         for r in rows if r["cache"] == setting.name and r["dataset"] == d],
                        out / "predictions" / setting.name.replace("%", "pct") / f"{d}.jsonl")
        table = lb.longbench_markdown(summary, names, label, cfg.e)
        (out / "longbench.md").write_text(table + "\n")
        plot_heatmaps([("score by dataset", [[s["datasets"][d] for s in summary] for d in names])], names,
                      [s["cache"] for s in summary], out / "longbench.png", xlabel="cache", ylabel="dataset",
                      title=f"LongBench{'-E' if cfg.e else ''}: {label}")
    print(table)
    print(f"results: {out / 'results.json'}, {out / 'longbench.md'}, {out / 'predictions'}")
    return 0
