"""What every sinklora training run shares: model set-up (position interpolation, LoRA+, training
attention), the output folder's life cycle (refuse / resume / overwrite), the Trainer, and saving.

`sinklora train` (continued pretraining) and `sinklora sft` (instruction tuning) differ only in data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sinklora import atomic, runtime
from sinklora.config import save_config, to_dict
from sinklora.defaults import LEARNING_RATE, WARMUP_STEPS
from sinklora.models.lora import LoraSettings
from sinklora.runtime import use_bf16
from sinklora.settings import TrainingConfig
from sinklora.train.checkpoints import CheckpointTidy, last_checkpoint

logger = logging.getLogger(__name__)

RESOLVED_CONFIG = "sinklora_config.yaml"


@contextlib.contextmanager
def evaluating(model: Any, *, use_cache: bool | None = None) -> Iterator[None]:
    """``model`` in eval mode inside the block (and ``config.use_cache`` set, when given); its training
    mode and ``use_cache`` come back on exit, exceptions included."""
    was_training, was_caching = model.training, model.config.use_cache
    model.eval()
    if use_cache is not None:
        model.config.use_cache = use_cache
    try:
        yield
    finally:
        model.train(was_training)
        model.config.use_cache = was_caching


# ---- the output folder ---------------------------------------------------------------------------


def _comparable(cfg: dict) -> dict:
    """The parts of a resolved config that define a run (what may change on resume is left out)."""
    cfg = json.loads(json.dumps(cfg))
    for key in ("resume", "overwrite", "output_dir", "eval"):
        cfg.pop(key, None)
    cfg.get("train", {}).pop("max_steps", None)
    cfg.get("train", {}).pop("save_steps", None)
    return cfg


def prepare_output_dir(cfg: Any) -> Path | None:
    """Create ``cfg.output_dir`` or decide what to do with an existing one. Returns the checkpoint to
    resume from (None for a fresh run). Refuses, before any heavy work, to mix two different runs."""
    import yaml

    out = Path(cfg.output_dir)
    saved = out / RESOLVED_CONFIG
    if not runtime.is_main_process():  # rank 0 decides (and refuses); the others must not race its writes
        return last_checkpoint(out, warn=False) if cfg.resume and out.is_dir() else None
    if out.exists() and any(out.iterdir()):
        if cfg.overwrite:
            logger.warning("overwrite=true: deleting the previous run in %s", out)
            shutil.rmtree(out)
        elif not saved.is_file():
            raise ValueError(f"output_dir={str(out)!r} exists and is not a sinklora run: choose another "
                             "output_dir, or pass overwrite=true to delete its contents")
        else:
            previous = yaml.safe_load(saved.read_text())
            if not cfg.resume:
                raise ValueError(f"output_dir={str(out)!r} already holds a run: pass resume=true to continue it, "
                                 "overwrite=true to start again, or choose another output_dir")
            if _comparable(previous) != _comparable(to_dict(cfg)):
                raise ValueError(f"resume=true but output_dir={str(out)!r} holds a run with a different "
                                 f"configuration (see {saved}); only max_steps, save_steps and eval settings may change")
            ckpt = last_checkpoint(out)
            if ckpt is None:
                logger.warning("resume=true but %s has no complete checkpoint: starting from step 0", out)
            else:
                logger.info("resuming from %s", ckpt)
            save_config(cfg, saved)  # the saved config says what this run does (e.g. a new max_steps)
            return ckpt
    elif cfg.resume:
        logger.warning("resume=true but %s holds no run yet: starting a fresh one", out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    return None


# ---- model ---------------------------------------------------------------------------------------


def build_model(model_name: str, target_len: int, *, original_len: int | None, rope_rounding: str,
                lora: LoraSettings, precision: str, adapter: str | None = None):
    """Base model with position interpolation to ``target_len``, wrapped in LoRA+ -> (model, tokenizer).

    ``adapter``: continue training a sinklora adapter (e.g. SFT after context extension); its RoPE
    record is applied first, so the extension is kept (extending again to the same length is a no-op).
    """
    from sinklora.models.loading import load_model, split_adapter
    from sinklora.models.lora import apply_lora_plus

    model_name, adapter = split_adapter(model_name, adapter)  # a model given as an adapter folder continues it
    dtype = torch.bfloat16 if use_bf16(precision) else torch.float32
    model, tokenizer = load_model(model_name, adapter=adapter, dtype=dtype, context_len=target_len,
                                  original_len=original_len, rope_rounding=rope_rounding, is_trainable=True)
    if adapter is None:
        model = apply_lora_plus(model, lora)
    model.config.use_cache = False
    return model, tokenizer


# ---- the Trainer ---------------------------------------------------------------------------------


def make_trainer(model, tokenizer, dataset, tcfg: TrainingConfig, output_dir: Path, *, tokens_per_row: int,
                 collator=None, callbacks: list | None = None, longest_row: int | None = None,
                 base_model: str | None = None):
    """An HF Trainer with the paper's recipe: AdamW, warm-up then constant LR, bf16 on GPU.

    ``tcfg.max_steps`` must be resolved (presets); ``tokens_per_row`` (tokens in one dataset item) makes
    the logged ``tokens_per_s``; ``longest_row``: rows vary up to it (sequence parallelism on CPU pads to it);
    ``base_model`` (the name the base was loaded by) goes into each checkpoint's record and model card.
    """
    from transformers import Trainer, default_data_collator

    from sinklora.hf import sequence_parallel
    from sinklora.hf.trainer import training_arguments

    sp = tcfg.sequence_parallel
    args = training_arguments(
        output_dir=str(output_dir),
        max_steps=tcfg.max_steps,
        per_device_train_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum,
        learning_rate=tcfg.learning_rate or LEARNING_RATE,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=tcfg.warmup_steps if tcfg.warmup_steps is not None else WARMUP_STEPS,
        weight_decay=tcfg.weight_decay,
        bf16=use_bf16(tcfg.precision),
        activation_checkpointing=tcfg.activation_checkpointing,
        logging_steps=tcfg.logging_steps,
        save_strategy="steps",
        save_steps=tcfg.save_steps or max(1, tcfg.max_steps // 4),
        save_total_limit=tcfg.save_total_limit,
        seed=tcfg.seed,
        data_seed=tcfg.seed,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        deepspeed=tcfg.deepspeed,
        disable_tqdm=False,
        **sequence_parallel.trainer_options(sp),
    )
    from sinklora.models.lora import tied_keys

    collator = collator or default_data_collator
    if sp > 1:  # Ulysses: N processes share each row (hf/sequence_parallel.py)
        collator = sequence_parallel.ShardableBatches(collator, sp, tokenizer.pad_token_id, longest_row)
        callbacks = [sequence_parallel.callback(sp)] + list(callbacks or [])
    tokens_per_step = tokens_per_row * tcfg.batch_size * tcfg.grad_accum * runtime.world_size() // sp
    trainer = sequence_parallel.trainer_class() if sp > 1 else Trainer
    return trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[ThroughputCallback(tokens_per_step), CheckpointTidy(tied_keys(model), base_model)] + list(callbacks or []),
    )


def ThroughputCallback(tokens_per_step: int):
    """Adds ``tokens_per_s`` (training tokens per second since the previous log) to every log entry."""
    from transformers import TrainerCallback

    class _Throughput(TrainerCallback):
        def __init__(self):
            self.t0, self.step0 = None, 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.step0 = time.perf_counter(), state.global_step

        def on_log(self, args, state, control, logs=None, **kw):
            if logs is None or "loss" not in logs or self.t0 is None:
                return
            now = time.perf_counter()
            tokens = (state.global_step - self.step0) * tokens_per_step
            if tokens > 0:
                logs["tokens_per_s"] = round(tokens / (now - self.t0), 1)
                if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
                    state.log_history[-1]["tokens_per_s"] = logs["tokens_per_s"]  # the Trainer logged a copy
            self.t0, self.step0 = now, state.global_step

    return _Throughput()


def train_and_save(trainer, output_dir: Path, resume_from: Path | None, base_model: str | None = None) -> dict:
    """Run (or resume) training, then save the adapter (LoRA + embeddings + norms + RoPE record + model
    card naming ``base_model``), the tokenizer, the log history and a loss plot. Returns a summary."""
    from sinklora.eval.plots import plot_loss
    from sinklora.models.lora import restore_tied, save_adapter

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if resume_from is not None:  # the Trainer reloads checkpoints through peft, which wants every tensor
        if trainer.is_world_process_zero():
            restore_tied(resume_from)
        trainer.accelerator.wait_for_everyone()
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - t0
    history = trainer.state.log_history
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_adapter(model, output_dir, base_model=base_model)
        trainer.processing_class.save_pretrained(output_dir)
        atomic.write_text(output_dir / "log_history.json", json.dumps(history, indent=1))
        if any("loss" in h for h in history):
            plot_loss(history, output_dir / "loss.png")
    losses = [h["loss"] for h in history if "loss" in h]
    speeds = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "tokens_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "peak_gpu_gib": round(peak, 2) if peak is not None else None,
        "train_loss": result.training_loss,
    }
