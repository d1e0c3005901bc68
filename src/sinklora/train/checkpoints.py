"""Checkpoints a run can trust: verified before resuming, the newest complete one chosen, tidied after saving.

The Trainer writes ``checkpoint-N/`` file by file (adapter, optimizer, scheduler, RNG state, then
``trainer_state.json``) and deletes older ones only after that. A kill midway leaves a folder that lacks
files or holds a truncated one, and the Trainer's own resume would then silently start a fresh optimizer
(no ``optimizer.pt``) or fail without naming the file. :func:`checkpoint_problems` checks every file a
resume reads; :func:`last_checkpoint` falls back to the newest checkpoint without problems and says why.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_MODEL_FILES = ("adapter_config.json", "adapter_model.safetensors")
_TORCH_FILES = ("optimizer.pt", "scheduler.pt")  # torch.save writes zip archives; a cut one has no directory


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def checkpoint_problems(ckpt: Path) -> list[str]:
    """What a resume from ``ckpt`` would miss: absent, empty, truncated or unreadable files ([] = complete)."""
    problems = []
    for name in (*_MODEL_FILES, "trainer_state.json"):
        if not (ckpt / name).is_file() or (ckpt / name).stat().st_size == 0:
            problems.append(f"{name} (missing)")
    # DeepSpeed keeps optimizer and scheduler in its own folder, named by `latest`
    torch_files = [] if (ckpt / "latest").is_file() else list(_TORCH_FILES)
    rng = sorted(ckpt.glob("rng_state*.pth"))
    if not rng:
        problems.append("rng_state.pth (missing)")
    for path in [ckpt / name for name in torch_files] + rng:
        if not path.is_file():
            problems.append(f"{path.name} (missing)")
        elif not zipfile.is_zipfile(path):
            problems.append(f"{path.name} (truncated)")
    if "trainer_state.json (missing)" not in problems:
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, ValueError):
            problems.append("trainer_state.json (unreadable)")
    if "adapter_model.safetensors (missing)" not in problems:
        try:
            from safetensors import safe_open

            with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
                f.keys()
        except Exception:  # safetensors raises its own error type for a cut or corrupt file
            problems.append("adapter_model.safetensors (truncated)")
    return problems


def last_checkpoint(output_dir: Path, *, warn: bool = True) -> Path | None:
    """The newest checkpoint whose files are all there and readable; incomplete newer ones are named in a
    warning (with what they lack) and skipped."""
    candidates = sorted((p for p in Path(output_dir).glob("checkpoint-*")
                         if p.is_dir() and p.name.split("-")[1].isdigit()), key=checkpoint_step, reverse=True)
    for ckpt in candidates:
        problems = checkpoint_problems(ckpt)
        if not problems:
            return ckpt
        if warn:
            logger.warning("%s is incomplete (%s): skipping it for an older checkpoint", ckpt, ", ".join(problems))
    return None


def CheckpointTidy(tied: dict[str, str], base_model: str | None = None):
    """After each checkpoint save, what the final adapter gets too: the tied embedding stored once, the RoPE
    record (so a checkpoint loads with its context extension), the model card, the usual permissions."""
    from transformers import TrainerCallback

    from sinklora.models.lora import finish_adapter_folder

    class _Tidy(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and model is not None and ckpt.is_dir():
                finish_adapter_folder(ckpt, model, base_model, tied)

    return _Tidy()
