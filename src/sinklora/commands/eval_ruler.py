"""RULER long-context suite (needles, variable tracking, word extraction, QA) generated offline, per length and cache.

Tasks are generated locally with the model's own tokenizer (seeded; see sinklora.eval.ruler_tasks), answered
greedily under each cache setting and scored as RULER does (share of the expected answers in the output).
Writes results.json (scores, metadata), ruler.md (tasks x lengths per cache, then score vs compression),
ruler.png (heatmaps), predictions.jsonl and config.yaml to output_dir.

    sinklora eval ruler lengths=1024,2048 samples=5
    sinklora eval ruler adapter=runs/smollm2-32k lengths=8192,16384,32768
    sinklora eval ruler caches=full,h2o:0.5,h2o:0.2,snapkv:0.2 lengths=4096
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sinklora.commands.options import SuiteCacheOptions, SuiteModelOptions
from sinklora.config import option

ALL_TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
             "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa"]


@dataclass
class RulerConfig(SuiteCacheOptions, SuiteModelOptions):  # fields: model options first, then cache
    output_dir: str = option("outputs/eval/ruler", "folder for results.json, ruler.md, ruler.png, predictions.jsonl")
    tasks: list[str] = option(help="RULER tasks (default: all 12)", factory=lambda: list(ALL_TASKS))
    lengths: list[int] = option(help="sequence lengths in tokens (prompt + RULER's answer budget, as RULER's "
                                "max_seq_length)", factory=lambda: [4096, 8192])
    samples: int = option(10, "samples per (task, length); RULER uses 500")
    seed: int = option(0, "seed of every generated sample")
    source: str = option("books", "corpus of the document haystacks and of task qa (a built-in name, folder, "
                         "file or hf:NAME; qa needs plays)")
    split: Literal["train", "heldout", "all"] = option("heldout", "split of source (by work)")
    vt_chains: int = option(1, "vt: chains of assignments (one is asked about, the others distract)")
    vt_hops: int = option(4, "vt: assignments after the first in each chain")
    cwe_freq_cw: int = option(30, "cwe: repeats of each common word (from 4096 tokens; below, 6 as RULER)")
    cwe_freq_ucw: int = option(3, "cwe: repeats of each uncommon word (from 4096 tokens; below, 1)")
    cwe_num_cw: int = option(10, "cwe: common words to find")
    fwe_alpha: float = option(2.0, "fwe: exponent of the Zipf (zeta) distribution of word counts, > 1")
    max_new_tokens: int | None = option(None, "cap on generated tokens (default RULER's per task: niah 128, vt 30, "
                                        "cwe 120, fwe 50, qa 32); prompts are sized with RULER's either way")
    save_prompts: bool = option(False, "also write samples.jsonl with every prompt (large)")

    def validate(self) -> list[str]:
        errors = SuiteModelOptions.validate(self) + SuiteCacheOptions.validate(self)
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown or not self.tasks:
            errors.append(f"tasks={self.tasks}: choose from {', '.join(ALL_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            errors.append(f"tasks={self.tasks}: a task appears twice")
        if not self.lengths or any(n < 256 for n in self.lengths):
            errors.append(f"lengths={self.lengths}: give lengths >= 256 tokens, e.g. lengths=4096,8192")
        if len(set(self.lengths)) != len(self.lengths):
            errors.append(f"lengths={self.lengths}: a length appears twice")
        for name in ("samples", "vt_chains", "vt_hops", "cwe_freq_cw", "cwe_freq_ucw", "cwe_num_cw"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)}: must be >= 1")
        if self.cwe_freq_ucw >= self.cwe_freq_cw:
            errors.append(f"cwe_freq_ucw={self.cwe_freq_ucw}: must be below cwe_freq_cw={self.cwe_freq_cw} "
                          "(common words must be repeated more)")
        if not self.fwe_alpha > 1.0:
            errors.append(f"fwe_alpha={self.fwe_alpha}: must be > 1 (the zeta distribution diverges at 1)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            errors.append(f"max_new_tokens={self.max_new_tokens}: must be >= 1, or omit it")
        if not self.source:
            errors.append("source='': give a corpus (e.g. books), or leave the document tasks out of tasks")
        return errors


CONFIG = RulerConfig


def main(cfg: RulerConfig) -> int:
    import time
    from pathlib import Path

    from sinklora.config import save_config
    from sinklora.eval.results import run_metadata, write_results
    from sinklora.eval.ruler import plot_ruler, ruler_markdown, run_ruler, summarize
    from sinklora.eval.ruler_haystacks import Resources
    from sinklora.eval.ruler_tasks import RulerOptions, generate_samples
    from sinklora.eval.suite_report import write_jsonl

    out = Path(cfg.output_dir)
    settings = cfg.cache_settings()
    model, tokenizer = cfg.load()
    opts = RulerOptions(vt_chains=cfg.vt_chains, vt_hops=cfg.vt_hops, cwe_freq_cw=cfg.cwe_freq_cw,
                        cwe_freq_ucw=cfg.cwe_freq_ucw, cwe_num_cw=cfg.cwe_num_cw, fwe_alpha=cfg.fwe_alpha,
                        chat=cfg.use_chat(tokenizer))
    t0 = time.perf_counter()
    samples = generate_samples(tokenizer, cfg.tasks, cfg.lengths, cfg.samples, cfg.seed, opts,
                               Resources(cfg.source, cfg.split))
    generation_seconds = time.perf_counter() - t0
    label, records = cfg.run_label(), []
    save_config(cfg, out / "config.yaml")
    if cfg.save_prompts:
        write_jsonl([{"task": s.task, "length": s.length, "index": s.index, "prompt": s.prompt, "answers": s.answers,
                      "prompt_tokens": s.prompt_tokens} for s in samples], out / "samples.jsonl")
    for k, setting in enumerate(settings):  # results are rewritten after each setting: a run cut short keeps them
        records += run_ruler(model, tokenizer, samples, [setting], max_new_tokens=cfg.max_new_tokens)
        done = settings[:k + 1]
        summary = summarize(records, cfg.tasks, cfg.lengths, [s.name for s in done])
        payload = {
            "kind": "ruler", "label": label,
            "metadata": run_metadata(model=cfg.model, adapter=cfg.adapter, lengths=cfg.lengths, seeds=[cfg.seed],
                                     loaded_model=model, caches=[s.__dict__ for s in done], tasks=cfg.tasks,
                                     samples=cfg.samples, chat_template=opts.chat, source=cfg.source, split=cfg.split,
                                     max_new_tokens=cfg.max_new_tokens,
                                     task_generation_seconds=round(generation_seconds, 2),
                                     wall_seconds=round(time.perf_counter() - t0, 2)),
            "scoring": "RULER: string_match_all (niah, vt, cwe, fwe), string_match_part (qa); mean x 100",
            "tasks": cfg.tasks, "lengths": cfg.lengths, "summary": summary,
        }
        write_results(payload, out / "results.json")
        write_jsonl(records, out / "predictions.jsonl")
        table = ruler_markdown(summary, cfg.tasks, cfg.lengths, label)
        (out / "ruler.md").write_text(table + "\n")
        plot_ruler(summary, cfg.tasks, cfg.lengths, out / "ruler.png", f"RULER: {label}")
    print(table)
    print(f"results: {out / 'results.json'}, {out / 'ruler.md'}, {out / 'ruler.png'}")
    return 0

