"""LoRA+ (LongLoRA's name): LoRA on the attention projections plus fully trained embeddings and norms.

The extra weights are peft ``modules_to_save``, so ``save_pretrained`` writes them with the adapter
and ``merge_and_unload`` puts them into the merged model (setting ``requires_grad`` by hand, LongLoRA's
way, trains them but never saves them). Models with tied input/output embeddings (SmolLM2, Llama-3.2)
use peft's ``ensure_weight_tying``: the output layer shares the trained embedding copy, during
training, in the saved adapter and after reloading. peft writes that shared matrix twice (once per
module); :func:`store_tied_once` keeps one copy and names the other in the file's metadata
(:data:`TIED_METADATA`), and :func:`load_adapter` puts it back (SmolLM2: 113 MB saved per adapter).

Activation checkpointing needs no ``enable_input_require_grads()`` from us: with LoRA+ the embedding is
trainable, so the first checkpointed block's input already requires grad; and for plain LoRA
(``trainable_extra=[]``) transformers' ``gradient_checkpointing_enable`` (5.17 and 5.24) registers that
hook itself and defaults to non-reentrant checkpointing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sinklora import atomic
from sinklora.config import option
from sinklora.models import rope

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    r: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(0.0, "dropout on the LoRA input")
    target_modules: list[str] = option(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        help="module names (last path component) that get LoRA adapters",
    )
    trainable_extra: list[str] = option(
        factory=lambda: ["embed_tokens", "norm"],
        help="module name suffixes trained fully and saved with the adapter (LoRA+: embeddings and every norm); "
        "[] for plain LoRA",
    )

    def validate(self) -> list[str]:
        errors = []
        if self.r < 1:
            errors.append(f"r={self.r}: the LoRA rank must be >= 1 (the paper uses 8)")
        if self.alpha <= 0:
            errors.append(f"alpha={self.alpha}: must be > 0 (the paper uses 16)")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout={self.dropout}: must be in [0, 1) (the paper uses 0)")
        if not self.target_modules:
            errors.append("target_modules=[]: name at least one module, e.g. [q_proj, k_proj, v_proj, o_proj]")
        for name in ("target_modules", "trainable_extra"):
            bad = [m for m in getattr(self, name) if not m or m != m.strip()]
            if bad:
                errors.append(f"{name}={getattr(self, name)!r}: empty or padded module names {bad!r}")
        return errors


def _matches(module_names: list[str], selector: str, *, suffix: bool) -> list[str]:
    """The modules a selector names, by sinklora's rule (not peft's, which changed in 0.22): a
    ``target_modules`` entry is a whole trailing path component (``q_proj``, ``self_attn.q_proj``), a
    ``trainable_extra`` entry any suffix of a module name (``norm`` names ``input_layernorm`` too)."""
    if suffix:
        return [n for n in module_names if n.endswith(selector)]
    return [n for n in module_names if n == selector or n.endswith("." + selector)]


def resolve_modules(model: torch.nn.Module, settings: LoraSettings) -> dict[str, dict[str, list[str]]]:
    """``{"target_modules": {selector: [full names]}, "trainable_extra": {...}}``: every module each selector
    names in ``model``. Every selector must name at least one module (one that names nothing trains nothing),
    and no module may be both a LoRA target and fully trained."""
    names = [n for n, _ in model.named_modules() if n]
    found: dict[str, dict[str, list[str]]] = {}
    errors = []
    for field_name, suffix in (("target_modules", False), ("trainable_extra", True)):
        found[field_name] = {}
        for selector in getattr(settings, field_name):
            hits = _matches(names, selector, suffix=suffix)
            if not hits:
                errors.append(f"{field_name} entry {selector!r} matches no module of {type(model).__name__}")
            found[field_name][selector] = hits
    both = set(_names(found["target_modules"])) & set(_names(found["trainable_extra"]))
    if both:
        errors.append(f"modules {sorted(both)[:3]} are named by both target_modules and trainable_extra: a module "
                      "gets LoRA factors or is trained fully, not both")
    if errors:
        examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})[:30])
        raise ValueError("; ".join(errors) + f" (module names include: {examples})")
    return found


def _names(by_selector: dict[str, list[str]]) -> list[str]:
    """The full module names of a selector table, each once, in model order of first appearance."""
    return list(dict.fromkeys(n for hits in by_selector.values() for n in hits))


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing``: hide that FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def ties_embeddings(model: torch.nn.Module) -> bool:
    """True when the output layer shares the input embedding's weight."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def apply_lora_plus(model: Any, settings: LoraSettings | None = None) -> Any:
    """Wrap ``model`` in a ``peft.PeftModel`` with LoRA on ``target_modules`` and full training of
    ``trainable_extra``. Only LoRA A/B and the extra modules' copies are trainable afterwards.

    peft is handed the full module names sinklora resolved (:func:`resolve_modules`), never the selectors,
    so its own name matching (peft 0.22 matches ``modules_to_save`` only at a dot boundary: ``norm`` no
    longer names ``input_layernorm``) cannot change what is trained; :func:`check_trained_set` then checks
    that the trainable and the saved tensors are exactly those modules' and raises otherwise."""
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    errors = settings.validate()
    if errors:
        raise ValueError("invalid LoRA settings: " + "; ".join(errors))
    found = resolve_modules(model, settings)
    targets, extra = _names(found["target_modules"]), _names(found["trainable_extra"])
    tied = ties_embeddings(model)
    embed_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    embed_trained = embed_name in extra
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=extra or None,
        # tied models (SmolLM2): the output layer must use the trained embedding copy, not the frozen one
        ensure_weight_tying=tied and embed_trained,
    )
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    if tied and embed_trained:
        assert ties_embeddings(peft_model.get_base_model()), "peft left lm_head untied from the trained embedding"
    check_trained_set(peft_model, targets, extra)
    counts = trainable_counts(peft_model)
    logger.info(
        "LoRA+ r=%d alpha=%g on %s (%d modules); fully trained: %s; trainable parameters: %s",
        settings.r, settings.alpha, ",".join(settings.target_modules), len(targets),
        ", ".join(f"{sel} ({len(hits)} modules)" for sel, hits in found["trainable_extra"].items()) or "none",
        ", ".join(f"{k} {v:,}" for k, v in counts.items()),
    )
    return peft_model


def expected_tensors(peft_model: Any, targets: list[str], extra: list[str]) -> tuple[set[str], set[str]]:
    """``(trainable, saved)``: the parameter names a LoRA+ wrap must train and the keys peft must save, for
    LoRA on ``targets`` and full training of ``extra`` (full module names), written from the definition
    (every parameter of each extra module, A and B of each target), not read from peft's choices."""
    base, adapter = peft_model.get_base_model(), peft_model.active_adapter
    modules = dict(base.named_modules())
    trainable, saved = set(), set()
    for name in targets:
        for ab in ("lora_A", "lora_B"):
            trainable.add(f"base_model.model.{name}.{ab}.{adapter}.weight")
            saved.add(f"base_model.model.{name}.{ab}.weight")
    for name in extra:
        original = getattr(modules[name], "original_module", modules[name])  # peft's wrapper keeps the frozen one
        for pname, _ in original.named_parameters():
            trainable.add(f"base_model.model.{name}.modules_to_save.{adapter}.{pname}")
            saved.add(f"base_model.model.{name}.{pname}")
    return trainable, saved


def check_trained_set(peft_model: Any, targets: list[str], extra: list[str]) -> None:
    """Raise unless ``peft_model`` trains exactly :func:`expected_tensors` and saves exactly those (plus, for
    a tied output layer, the shared matrix once more, as peft writes it)."""
    from peft import get_peft_model_state_dict

    want_trainable, want_saved = expected_tensors(peft_model, targets, extra)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    saved = set(get_peft_model_state_dict(peft_model))
    tied = {f"base_model.model.{n}" for n in tied_output_names(peft_model.get_base_model())}
    problems = []
    for what, got, want, allowed in (("trainable", trainable, want_trainable, set()),
                                     ("saved", saved, want_saved, tied)):
        if got - want - allowed:
            problems.append(f"{what} but not asked for: {sorted(got - want - allowed)[:3]}")
        if want - got:
            problems.append(f"asked for but not {what}: {sorted(want - got)[:3]} ({len(want - got)} in all)")
    if problems:
        import peft

        raise RuntimeError(f"peft {peft.__version__} does not train what sinklora asked for (LoRA on {len(targets)} "
                           f"modules, {len(extra)} modules trained fully): " + "; ".join(problems)
                           + ". Install a peft version sinklora supports (see pyproject.toml)")


def tied_output_names(model: torch.nn.Module) -> list[str]:
    """``["lm_head.weight"]`` when the output layer shares the input embedding's weight, else []."""
    if not ties_embeddings(model):
        return []
    out = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is out)
    return [f"{name}.weight"]


def trainable_counts(peft_model: Any) -> dict[str, int]:
    """Trainable parameter counts split into LoRA factors and fully trained extra modules."""
    counts = {"lora": 0, "extra": 0, "total": 0}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            counts["lora" if ".lora_" in name else "extra"] += p.numel()
            counts["total"] += p.numel()
    return counts


ADAPTER_WEIGHTS = "adapter_model.safetensors"
# safetensors metadata key of an adapter file whose tied tensors are stored once: JSON {dropped key: kept key}
TIED_METADATA = "sinklora_tied"


def tied_keys(peft_model: Any) -> dict[str, str]:
    """``{key: key it shares its tensor with}`` among the adapter's saved tensors (the tied output layer)."""
    from peft import get_peft_model_state_dict

    first: dict[tuple, str] = {}
    tied = {}
    for key, tensor in get_peft_model_state_dict(peft_model).items():
        if not tensor.numel():
            continue
        # the same elements, not merely the same storage: DeepSpeed flattens all parameters into one buffer
        where = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if where in first:
            tied[key] = first[where]
        else:
            first[where] = key
    return tied


def read_tied(weights_file: str | os.PathLike) -> dict[str, str]:
    """The :data:`TIED_METADATA` of an adapter weights file ({} for a file that stores every tensor)."""
    from safetensors import safe_open

    with safe_open(str(weights_file), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(TIED_METADATA, "{}"))


def store_tied_once(folder: str | os.PathLike, tied: dict[str, str]) -> int:
    """Rewrite ``folder``'s adapter file without the tied duplicates ``tied`` (atomically); returns bytes saved."""
    import torch
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not tied or not path.is_file():
        return 0
    weights = load_file(path)
    if not all(k in weights for k in tied):
        return 0  # already stored once
    for dropped, kept in tied.items():
        if not torch.equal(weights[dropped], weights[kept]):
            raise RuntimeError(f"{path}: {dropped} should be tied to {kept} but differs; not deduplicating")
    before = path.stat().st_size
    for dropped in tied:
        del weights[dropped]
    _rewrite_weights(path, weights, {TIED_METADATA: json.dumps(tied, sort_keys=True)})
    return before - path.stat().st_size


def _rewrite_weights(path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Replace the safetensors file ``path`` with ``weights`` atomically, with the usual permissions."""
    from safetensors.torch import save_file

    with atomic.atomic_path(path) as tmp:
        save_file(weights, tmp, metadata={"format": "pt", **(metadata or {})})
    usual_permissions(path)


def restore_tied(folder: str | os.PathLike) -> None:
    """Write the tied duplicates back into ``folder``'s adapter file (atomically), for readers that need
    every key, like the Trainer resuming a checkpoint through ``PeftModel.load_adapter``."""
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    tied = read_tied(path)
    if not tied:
        return
    weights = load_file(path)
    for dropped, kept in tied.items():
        weights[dropped] = weights[kept].clone()
    _rewrite_weights(path, weights)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_permissions(*paths: str | os.PathLike) -> None:
    """Give files 0666 and folders 0777 minus the umask (e.g. 0644 / 0755): safetensors and tempfile create
    owner-only files, which other users of a shared run folder or model cache could not read."""
    mask = _umask()
    for p in map(Path, paths):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def save_adapter(peft_model: Any, folder: str | os.PathLike, base_model: str | None = None) -> Path:
    """``save_pretrained`` with the tied embedding stored once, the base config's RoPE settings (read back
    by ``load_model(adapter=...)``, so an adapter trained at an extended context is evaluated with that
    context), and a model card (README.md) that says how to load it without sinklora.

    ``base_model``: the name the base was loaded by (alias, hub id or folder); default: peft's record.
    Every file appears atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adapter-", dir=folder) as tmp:
        staged = Path(tmp)
        peft_model.save_pretrained(staged)
        finish_adapter_folder(staged, peft_model, base_model)
        for f in sorted(staged.iterdir()):  # the weights first: a reader never sees a record without them
            os.replace(f, folder / f.name)
    return folder


def finish_adapter_folder(folder: str | os.PathLike, peft_model: Any, base_model: str | None = None,
                          tied: dict[str, str] | None = None) -> None:
    """What sinklora adds to a folder peft saved (an adapter or a Trainer checkpoint): the tied tensors
    stored once, the RoPE record naming the base, the model card, and the usual file permissions."""
    from sinklora.models.card import write_adapter_card

    folder = Path(folder)
    peft_config = peft_model.peft_config[peft_model.active_adapter]
    tied = tied_keys(peft_model) if tied is None else tied
    store_tied_once(folder, tied)
    record = rope.save_context_record(peft_model.get_base_model().config, folder,
                                      base_model=_portable(base_model or peft_config.base_model_name_or_path))
    write_adapter_card(folder, json.loads(record.read_text()), peft_config, tied)
    usual_permissions(*(f for f in folder.iterdir() if f.is_file()))


def _portable(base_model: str) -> str:
    """A base named by a local folder is recorded as its absolute path (found again from any directory)."""
    path = Path(base_model).expanduser()
    return str(path.resolve()) if path.exists() else base_model


def load_adapter(model: Any, folder: str | os.PathLike, *, is_trainable: bool = False) -> Any:
    """``PeftModel.from_pretrained`` that also reads adapters whose tied tensors are stored once."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    tied = read_tied(folder / ADAPTER_WEIGHTS) if (folder / ADAPTER_WEIGHTS).is_file() else {}
    with quiet_peft():
        if not tied:
            return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
        config = PeftConfig.from_pretrained(str(folder))
        config.inference_mode = not is_trainable
        peft_model = PeftModel(model, config)
    weights = load_file(folder / ADAPTER_WEIGHTS)
    for dropped, kept in tied.items():
        weights[dropped] = weights[kept]
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in result.missing_keys if ".lora_" in k or ".modules_to_save." in k]
    if missing:
        raise ValueError(f"adapter={str(folder)!r}: {ADAPTER_WEIGHTS} lacks {len(missing)} tensors, e.g. {missing[0]}")
    if not ties_embeddings(peft_model.get_base_model()):
        raise RuntimeError(f"adapter={str(folder)!r}: the output layer did not come back tied to the embedding")
    return peft_model if is_trainable else peft_model.eval()
