"""Run bookkeeping shared by the eval commands: result files (metadata + numbers as one JSON document).

A result file is a JSON object ``{"kind": ..., "metadata": {...}, ...numbers...}``; ``metadata`` says
which model, adapter and attention pattern produced the numbers, at which lengths and seeds, with
which library versions and git commit, and when.
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from sinklora import atomic

logger = logging.getLogger(__name__)

_LIBRARIES = ("sinklora", "torch", "transformers", "peft", "accelerate", "tokenizers")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def git_commit(path: str | Path | None = None) -> str | None:
    """The HEAD commit of the repository holding ``path`` (default: this package), or None."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def describe_model(model: Any) -> dict[str, Any]:
    """Device, dtype and the position settings that decide what a context length means."""
    config = getattr(model, "config", None)
    try:
        param = next(model.parameters())
        device, dtype = str(param.device), str(param.dtype).removeprefix("torch.")
    except (AttributeError, StopIteration, TypeError):
        device = dtype = None
    return {
        "device": device,
        "dtype": dtype,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "rope_parameters": getattr(config, "rope_parameters", None),
        "peft": hasattr(model, "get_base_model"),
    }


def run_metadata(
    *,
    model: str,
    adapter: str | None = None,
    pattern: str = "full",
    lengths: list[int] | None = None,
    seeds: list[int] | None = None,
    loaded_model: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything needed to tell where a number came from; ``extra`` keys are added as they are."""
    meta: dict[str, Any] = {
        "model": model,
        "adapter": adapter,
        "pattern": pattern,
        "lengths": list(lengths) if lengths is not None else None,
        "seeds": list(seeds) if seeds is not None else None,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }
    if loaded_model is not None:
        meta["model_info"] = describe_model(loaded_model)
    meta.update(extra)
    return meta


def series_label(result: dict[str, Any]) -> str:
    """A result's name in plots: its ``label``, else model (+ adapter folder name)."""
    meta = result.get("metadata", {})
    if result.get("label") or meta.get("label"):
        return str(result.get("label") or meta.get("label"))
    name = str(meta.get("model", "model"))
    if meta.get("adapter"):
        name += f" + {Path(str(meta['adapter'])).name}"
    return name


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a result file")


def write_results(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` as indented JSON, atomically (a crash never leaves half a file)."""
    path = atomic.write_text(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")
    logger.info("wrote %s", path)
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file {str(path)!r} does not exist; run `sinklora eval ...` first")
    return json.loads(path.read_text())
