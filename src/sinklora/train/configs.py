"""The training commands' configs: ``sinklora train`` (:class:`ExtendConfig`), ``sinklora sft``
(:class:`SFTConfig`) and ``sinklora compare`` (:class:`CompareConfig`). Torch-free: the recipes in
this package run them, the command modules only parse them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sinklora.config import ConfigError, load_config, option, to_dict
from sinklora.defaults import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT, LEARNING_RATE, WARMUP_STEPS
from sinklora.models.lora import LoraSettings
from sinklora.settings import AttentionConfig, TrainingConfig

# the paper's SFT recipe (docs/method.md §1); filled into train.* when left unset
SFT_DEFAULTS = {"learning_rate": LEARNING_RATE, "warmup_steps": WARMUP_STEPS}

PRESETS = {
    # a smoke-scale run for a 2-core CPU: it exercises every stage in minutes, it does not extend much
    "cpu-smoke": dict(target_len=16384, train_len=1024, max_steps=6, learning_rate=2e-4, warmup_steps=2,
                      save_steps=3, eval_length=9216, eval_docs=1, passkey_depths=[0.5], passkey_trials=1, loss_rows=6),
    # the paper's recipe at SmolLM2 scale on one GPU: 8k -> 32k, 200 steps of 32k tokens
    "gpu": dict(target_len=32768, train_len=32768, max_steps=200, learning_rate=LEARNING_RATE, warmup_steps=WARMUP_STEPS,
                save_steps=50, eval_length=32768, eval_docs=4, passkey_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
                passkey_trials=2, loss_rows=4),
}


@dataclass
class EvalSettings:
    enabled: bool = option(True, "evaluate before and after training (full attention)")
    length: int | None = option(None, "context length for perplexity and passkey (default: from the preset)")
    corpus: str | None = option(None, "held-out corpus for perplexity (default: the training source)")
    docs: int | None = option(None, "held-out documents for perplexity (default: from the preset)")
    passkey_trials: int | None = option(None, "passkey trials per depth (default: from the preset)")
    passkey_depths: list[float] | None = option(None, "passkey depths in [0, 1] (default: from the preset)")
    seed: int = option(0, "passkey seed")
    loss_rows: int | None = option(None, "training rows whose mean loss (training attention) is measured before "
                                         "and after training: the same rows, so the two numbers compare; 0 = "
                                         "none (default: from the preset)")

    def validate(self) -> list[str]:
        from sinklora.data.corpora import check_source

        errors = []
        if self.length is not None and self.length < 64:
            errors.append(f"length={self.length}: must be at least 64 tokens (a passkey prompt needs room), "
                          "e.g. the target length")
        for name in ("docs", "passkey_trials"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"{name}={value}: must be >= 1")
        if self.passkey_depths is not None and (not self.passkey_depths
                                                or any(not 0 <= d <= 1 for d in self.passkey_depths)):
            errors.append(f"passkey_depths={self.passkey_depths}: give depths between 0.0 and 1.0, e.g. [0.5]")
        if self.loss_rows is not None and self.loss_rows < 0:
            errors.append(f"loss_rows={self.loss_rows}: must be >= 0 (0 = no fixed-row loss)")
        if self.corpus is not None and (problem := check_source(self.corpus, "corpus")):
            errors.append(problem)
        return errors


@dataclass
class ExtensionSettings:
    """What defines a context-extension run (``train``; ``compare`` runs one per attention method)."""

    model: str = option(DEFAULT_MODEL, "hub id, local folder, or the default model's alias")
    preset: Literal["auto", "cpu-smoke", "gpu"] = option("auto", "budget defaults: auto = gpu on CUDA, else cpu-smoke")
    data: str = option("books", "training documents: a corpus name, a .txt/.md file, a folder, a .json/.jsonl file, "
                                "or hf:NAME")
    on_error: Literal["fail", "skip"] = option("fail", "text files that are not UTF-8 (or binary): fail naming the "
                                                       "file and line, or skip them (counted)")
    target_len: int | None = option(None, "context length to extend to (RoPE factor = target / original)")
    original_len: int | None = option(None, "pretraining context length (default: the model config's); a smaller "
                                            "value makes a proxy experiment at short lengths (CPU)")
    rope_rounding: Literal["ceil", "exact"] = option("ceil", "RoPE factor rounding (LongLoRA: ceil)")
    train_len: int | None = option(None, "tokens per training row (default: target_len; smaller = smoke run)")
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def evaluates(self) -> bool:
        """Whether the run evaluates on held-out documents (``compare`` always does)."""
        return self.eval.enabled

    def validate(self) -> list[str]:
        from sinklora.data.corpora import check_source, is_single_text_file

        errors = []
        for name in ("target_len", "original_len", "train_len"):
            value = getattr(self, name)
            if value is not None and value < 2:
                errors.append(f"{name}={value}: must be at least 2 tokens")
        if (problem := check_source(self.data, "data")) is not None:
            errors.append(problem)
        elif self.evaluates() and is_single_text_file(self.data) and self.eval.corpus in (None, self.data):
            errors.append(f"data={self.data!r} is one document, so nothing is left to hold out for the evaluation: "
                          "set eval.corpus to other text (a file or folder)" +
                          (" or eval.enabled=false" if isinstance(self, ExtendConfig) else ""))
        return errors


@dataclass
class ExtendConfig(ExtensionSettings):
    output_dir: str = option("runs/extend", "where checkpoints, the adapter and results go")
    resume: bool = option(False, "continue the run in output_dir from its last checkpoint")
    overwrite: bool = option(False, "delete output_dir's previous run first")

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.resume and self.overwrite:
            errors.append("resume=true and overwrite=true: choose one")
        return errors


@dataclass
class TaskEvalSettings:
    tasks: str | None = option(None, "held-out task JSON/JSONL (e.g. test.jsonl of `sinklora data tasks`): "
                                     "exact-match accuracy before and after training; none = no evaluation")
    limit: int | None = option(None, "evaluate only the first N records")
    max_new_tokens: int = option(32, "most generated tokens per answer")
    max_len: int | None = option(None, "prompt budget in tokens, inputs cut in the middle (default: max_len)")
    before: bool = option(True, "also evaluate before training (false saves time on a resumed run)")

    def validate(self) -> list[str]:
        errors = []
        if self.tasks is not None and not Path(self.tasks).is_file():
            errors.append(f"tasks={self.tasks!r}: no such file; give a JSON/JSONL of instruction records "
                          "(`sinklora data tasks` writes test.jsonl) or leave it unset")
        for name in ("limit", "max_new_tokens", "max_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"{name}={value}: must be >= 1")
        return errors


@dataclass
class SFTConfig:
    model: str = option(DEFAULT_MODEL, "base model (alias, local folder, hub id) or a merged `sinklora export` folder")
    adapter: str | None = option(None, "a `sinklora train` output_dir: continue its LoRA+ adapter and extended RoPE")
    data: str | None = option(None, "instruction data: .json list / .jsonl file, saved dataset folder, or hf:NAME[:split]")
    columns: dict[str, str] = option(help="our field -> the data's column, e.g. {instruction: question, "
                                          "input: context, output: answer}", factory=dict)
    on_error: Literal["fail", "skip"] = option("fail", "invalid or unfittable records: fail the run, or skip them (counted)")
    system_prompt: str = option(DEFAULT_SYSTEM_PROMPT, "system message of the chat template ('' = none; "
                                                       "the Alpaca fallback template then uses Alpaca's)")
    max_len: int | None = option(None, "longest example in tokens (default: target_len)")
    truncate: Literal["middle", "none"] = option("middle", "over-long examples: cut the middle of `input`, or refuse")
    target_len: int | None = option(None, "context length (RoPE); default: the adapter's RoPE record, else the model's")
    original_len: int | None = option(None, "pretraining context length (default: the model config's)")
    rope_rounding: Literal["ceil", "exact"] = option("ceil", "RoPE factor rounding when target_len extends the model")
    batching: Literal["length_grouped", "packed"] = option(
        "length_grouped", "length_grouped: padded batches of similar lengths; packed: examples concatenated "
                          "into one row of <= max_len tokens per micro-batch (needs train.batch_size=1)")
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    eval: TaskEvalSettings = field(default_factory=TaskEvalSettings)
    output_dir: str = option("runs/sft", "where checkpoints, the adapter and results go")
    resume: bool = option(False, "continue the run in output_dir from its last checkpoint")
    overwrite: bool = option(False, "delete output_dir's previous run first")

    def validate(self) -> list[str]:
        errors = []
        if self.data is None:
            errors.append("data=None: give instruction data (a .json/.jsonl file, a dataset folder or hf:NAME)")
        elif self.data.startswith("hf:"):
            import importlib.util

            if importlib.util.find_spec("datasets") is None:
                errors.append(f"data={self.data!r}: Hugging Face datasets need the `datasets` package (pip install datasets)")
        elif not Path(self.data).exists():
            errors.append(f"data={self.data!r}: no such file or folder; give a .json/.jsonl file, a saved "
                          "dataset folder or hf:NAME[:split]")
        from sinklora.data.instruct import FIELDS

        bad = sorted(set(self.columns) - set(FIELDS))
        if bad:
            errors.append(f"columns={self.columns!r}: keys {bad} are not fields; keys must be among {', '.join(FIELDS)}")
        errors += [f"columns.{k}={v!r}: must be a non-empty column name" for k, v in self.columns.items()
                   if not isinstance(v, str) or not v.strip()]
        for name in ("max_len", "target_len", "original_len"):
            value = getattr(self, name)
            if value is not None and value < 16:
                errors.append(f"{name}={value}: must be at least 16 tokens")
        if self.max_len:
            errors += check_lengths(self)
        if self.adapter is not None:
            if not (Path(self.adapter) / "adapter_config.json").is_file():
                errors.append(f"adapter={self.adapter!r}: no adapter_config.json there; give a `sinklora train` output_dir")
            elif Path(self.adapter).resolve() == Path(self.output_dir).resolve():
                errors.append(f"adapter={self.adapter!r} is also output_dir: write the SFT run to another folder")
        if self.batching == "packed" and self.train.batch_size != 1:
            errors.append(f"train.batch_size={self.train.batch_size} with batching=packed: a packed micro-batch is "
                          "one row of up to max_len tokens; set train.batch_size=1 and raise train.grad_accum")
        if self.resume and self.overwrite:
            errors.append("resume=true and overwrite=true: choose one")
        return errors


def check_lengths(cfg: SFTConfig) -> list[str]:
    """max_len within the context, and the attention settings valid at max_len."""
    errors = []
    if cfg.target_len and cfg.max_len > cfg.target_len:
        errors.append(f"max_len={cfg.max_len} > target_len={cfg.target_len}: examples cannot be longer than the "
                      "context; raise target_len or lower max_len")
    return errors + cfg.attention.check_length(cfg.max_len)


@dataclass
class CompareConfig(ExtensionSettings):
    output_dir: str = option("runs/compare", "one sub-folder per method, plus the report")
    methods: list[str] = option(factory=lambda: ["full", "s2", "sf"],
                                help="attention methods; a variant adds settings: sf:sink_tokens=8,shifted_head_fraction=0")
    overwrite: bool = option(False, "retrain methods whose folder already holds a run")

    def evaluates(self) -> bool:
        return True

    def validate(self) -> list[str]:
        errors = super().validate()
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

    def extension(self, method: str, output_dir: str) -> ExtendConfig:
        """The ``train`` run of one method: this comparison's settings with the method's attention."""
        shared = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(ExtensionSettings)}
        shared["attention"] = method_attention(self.attention, method)
        return ExtendConfig(**shared, output_dir=output_dir)


def method_attention(base: AttentionConfig, method: str) -> AttentionConfig:
    """``"sf:sink_tokens=8,group_ratio=0.125"`` -> AttentionConfig(pattern="sf", ...), other fields from base."""
    pattern, _, extra = method.partition(":")
    overrides = {"pattern": pattern}
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = value.strip()
    merged = {**to_dict(base), **overrides}
    return load_config(AttentionConfig, overrides=[f"{k}={v}" for k, v in merged.items() if v is not None])
