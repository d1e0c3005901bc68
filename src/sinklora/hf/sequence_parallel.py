"""Sequence parallelism: N processes train on one sequence (DeepSpeed Ulysses), sinklora's attention inside.

One micro-batch on a group of N processes (``train.sequence_parallel=N``)::

    row (B, L) --Ulysses data-loader adapter--> rank r: tokens [r L/N, (r+1) L/N) with their position_ids
                                                and shift_labels (labels shifted before the cut)
    embeddings, norms, MLP, LoRA, logits, loss: on the rank's L/N tokens
    attention:  q, k, v (B, H, L/N, D) --all-to-all--> (B, H/N, L, D): rank r holds heads
                [r H/N, (r+1) H/N) over the WHOLE sequence (KV heads repeated when H_kv < N)
                --> sinklora's attention with Pattern(heads=(r H/N, H)) --all-to-all--> (B, L/N, H D)
    loss: the rank's labelled tokens, summed, over the step's token count (:func:`trainer_class`)

Groups and sinks are whole-sequence notions, so every rank computes exactly what one process computes
for the same heads; only the shifted-head rule needs the heads' global indices, which the pattern carries
(:attr:`sinklora.attention.Pattern.heads`). accelerate's ``ParallelismConfig(sp_backend="deepspeed")``
drives it inside the Trainer: it wraps the attention function registered under our name with DeepSpeed's
``UlyssesSPAttentionHF``, builds the process groups and shards the batches. Every DeepSpeed / accelerate
touch point of sinklora is in this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sinklora import runtime
from sinklora.attention import Pattern
from sinklora.hf.attention import ATTENTION, attention_modules, base_model, register, use_attention

logger = logging.getLogger(__name__)

MIN_DEEPSPEED = "0.18.2"  # UlyssesSPAttentionHF.register_with_transformers
MIN_ACCELERATE = "1.12.0"  # ParallelismConfig(sp_backend="deepspeed")
IGNORE_INDEX = -100


def _version(package: str) -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())


def _at_least(package: str, minimum: str) -> bool:
    have = _version(package)
    return have is not None and have >= tuple(int(p) for p in minimum.split("."))


def problems(size: int, config: Any, seq_len: int | None = None, world_size: int | None = None,
             varying_batch_size: int | None = None) -> list[str]:
    """What stops ``train.sequence_parallel=size`` on a model with this ``config``, rows of ``seq_len`` tokens
    (None: rows are padded to a multiple of ``size``) and ``world_size`` processes (default: this launch).
    ``varying_batch_size``: ``train.batch_size`` where the rows per micro-batch may vary (SFT)."""
    if size == 1:
        return []
    field = f"train.sequence_parallel={size}"
    errors = []
    if importlib.util.find_spec("deepspeed") is None or not _at_least("deepspeed", MIN_DEEPSPEED):
        errors.append(f"{field} needs DeepSpeed >= {MIN_DEEPSPEED}: pip install -e '.[deepspeed]' (README: "
                      "'Longer than one GPU' shows the CPU-only install)")
    if not _at_least("accelerate", MIN_ACCELERATE):
        errors.append(f"{field} needs accelerate >= {MIN_ACCELERATE} (ParallelismConfig): pip install -U accelerate")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    if heads % size:
        fits = [n for n in range(2, heads + 1) if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)]
        errors.append(f"{field}: the model's num_attention_heads={heads} is not divisible by {size} (each process "
                      f"attends with heads/N of them); use one of {fits}")
    elif kv_heads % size and size % kv_heads:
        errors.append(f"{field}: num_key_value_heads={kv_heads} and {size} do not divide one another (Ulysses "
                      "splits or repeats the key/value heads); choose N dividing or divided by it")
    if seq_len is not None and seq_len % size:
        errors.append(f"{field}: train_len={seq_len} is not a multiple of {size} (each process holds train_len/N "
                      f"tokens); use train_len={seq_len - seq_len % size or size}")
    if varying_batch_size not in (None, 1):
        errors.append(f"{field} with train.batch_size={varying_batch_size}: DeepSpeed's Ulysses is built for one "
                      "number of rows per micro-batch and SFT batches vary; set train.batch_size=1 (one long row "
                      "per micro-batch) and raise train.grad_accum, or use batching=packed")
    world = runtime.world_size() if world_size is None else world_size
    if world % size:
        errors.append(f"{field} with {world} process(es): launch a multiple of {size} processes, e.g. "
                      f"`accelerate launch --num_processes {size} -m sinklora.cli ...` (README: 'Longer than one GPU')")
    return errors


def trainer_options(size: int) -> dict[str, Any]:
    """``TrainingArguments`` keywords that turn Ulysses on (nothing for ``size`` 1)."""
    if size == 1:
        return {}
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True)  # SFT micro-batches vary in length
    # accelerate (1.15) accepts only its own names here, while DeepSpeed wraps any name in transformers'
    # registry: ours is set after accelerate's check (it is read once, by Accelerator._prepare_deepspeed)
    handler.sp_attn_implementation = ATTENTION
    # resuming, the Trainer would skip trained batches with accelerate's skip_first_batches, which cannot
    # take DeepSpeed's data-loader adapter: :func:`callback` skips them instead
    return {"parallelism_config": ParallelismConfig(sp_backend="deepspeed", sp_size=size, sp_handler=handler),
            "ignore_data_skip": True}


class ShardableBatches:
    """A collator wrapper giving Ulysses what it shards: ``position_ids`` (0, 1, ... per row when the
    collator gives none: after the cut they are the only record of where a token is) and rows padded to
    a multiple of N (pad id, label -100, attention_mask 0; pad positions restart at 0 in packed rows, so
    the padding is a document of its own and never joins the last one). Pads sit after every real token,
    so under causal patterns no real token sees them: Ulysses drops the padding mask.

    ``length``: on gloo (CPU) every row is padded to it, since DeepSpeed's adapter gathers the group's
    batches and gloo gathers equal sizes only (NCCL takes uneven ones).
    """

    def __init__(self, collate: Callable[[list], dict[str, torch.Tensor]], size: int, pad_id: int,
                 length: int | None = None):
        self.collate, self.size, self.pad_id, self.length = collate, size, int(pad_id), length

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        batch = dict(self.collate(items))
        ids = batch["input_ids"]  # (B, L)
        B, L = ids.shape
        packed = "position_ids" in batch
        if not packed:
            batch["position_ids"] = torch.arange(L).expand(B, L).clone()
        target = max(L, self.length) if self.length and _gathers_equal_sizes_only() else L
        extra = target - L + (-target % self.size)
        if extra:
            fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
            for key, value in fill.items():
                if key in batch:
                    batch[key] = torch.cat([batch[key], batch[key].new_full((B, extra), value)], dim=1)
            start = 0 if packed else L
            pads = torch.arange(start, start + extra).expand(B, extra)
            batch["position_ids"] = torch.cat([batch["position_ids"], pads.to(batch["position_ids"])], dim=1)
        return batch


def _gathers_equal_sizes_only() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_backend() == "gloo"


@functools.cache
def trainer_class() -> type:
    """transformers' Trainer whose sequence-parallel loss is the mean over every labelled token of the
    optimizer step (all micro-batches, all processes), with the gradient one process would get.

    Why not transformers' own SP loss: it all-gathers the ranks' losses (differentiably) into the group's
    mean, so each rank's backward carries N times its share, and DeepSpeed then SUMS gradients over a
    sequence-parallel group (and averages over data-parallel groups): the gradient comes out N times too
    large (hidden by Adam and clipping; grad_norm shows it). Here each rank backpropagates its own partial
    sum, scaled by the number of data-parallel groups D over the step's token count T.
    """
    import torch.distributed as dist
    from transformers import Trainer

    class SequenceParallelTrainer(Trainer):
        loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's token count

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            # the ranks hold disjoint shards of the step's labels (shifted before the cut): their sum is T
            count = torch.zeros((), dtype=torch.float64, device=device)
            for b in batches:
                count += (b["shift_labels"] != IGNORE_INDEX).sum().to(count)
            dist.all_reduce(count)
            return batches, count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "shift_labels" not in inputs or num_items_in_batch is None:  # not a training step of the adapter
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            from deepspeed.runtime.sequence_parallel import parallel_state_sp as groups

            group = groups.get_sequence_parallel_group()
            data_parallel = dist.get_world_size() // dist.get_world_size(group)
            # the model's loss over shift_labels (already shifted), summed and divided by T / D
            inputs = {**inputs, "labels": inputs["shift_labels"]}
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch.clamp(min=1) / data_parallel)
            loss = outputs.loss  # D * (this rank's sum) / T
            # every rank of a group reports the group's loss (the Trainer logs the mean over processes),
            # while its gradient stays its own share
            group_loss = loss.detach().clone()
            dist.all_reduce(group_loss, group=group)
            loss = loss + (group_loss - loss).detach()
            return (loss, outputs) if return_outputs else loss

    return SequenceParallelTrainer


def callback(size: int):
    """A TrainerCallback for the start of training, once DeepSpeed has built its groups and wrapped the data:

    - checks that this rank holds the heads :func:`training_attention` gave it (DeepSpeed puts
      consecutive ranks in a group);
    - on resume, skips the micro-batches the checkpoint has trained, by drawing them from DeepSpeed's
      data-loader adapter (every rank draws alike: each draw gathers from the group), so the run continues
      where it stopped, as the Trainer does without sequence parallelism.
    """
    from transformers import TrainerCallback

    class _SequenceParallel(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
            from deepspeed.runtime.sequence_parallel import parallel_state_sp as groups

            got = (groups.get_sequence_parallel_world_size(), groups.get_sequence_parallel_rank())
            if got != (size, _rank_in_group(size)):
                raise RuntimeError(f"DeepSpeed put rank {runtime.rank()} at position {got[1]} of a sequence-parallel "
                                   f"group of {got[0]}; sinklora expected {_rank_in_group(size)} of {size} (consecutive "
                                   "ranks): this DeepSpeed version groups ranks differently, so the head indices "
                                   "would be wrong")
            if state.global_step and train_dataloader is not None:
                # the adapter yields every batch of the group's ranks: len() micro-batches per epoch
                steps_per_epoch = -(-len(train_dataloader) // args.gradient_accumulation_steps)
                epochs, steps = divmod(state.global_step, steps_per_epoch)
                logger.info("resuming at step %d: skipping %d epochs and %d trained micro-batches", state.global_step,
                            epochs, steps * args.gradient_accumulation_steps)
                for _ in range(epochs):
                    for _ in train_dataloader:  # to its end, where it starts the next epoch as in the first run
                        pass
                for _ in range(steps * args.gradient_accumulation_steps):
                    next(train_dataloader)

    return _SequenceParallel()


def _rank_in_group(size: int) -> int:
    return runtime.rank() % size


def all_to_all_elements(config: Any, seq_len: int, size: int, *, batch_size: int = 1,
                        activation_checkpointing: bool = True) -> int:
    """Elements one rank hands to Ulysses' all-to-alls in one training micro-batch of ``batch_size`` rows of
    ``seq_len`` tokens, of which ``(size - 1) / size`` leave the rank. Per layer and pass: q (L/N tokens, H
    heads), k and v (L/N tokens, max(H_kv, N) heads: repeated when fewer than N) and the attention output
    (L tokens, H/N heads); passes: forward, backward (the gradients take the same all-to-alls back) and,
    with activation checkpointing, the forward recomputed in backward."""
    if size == 1:
        return 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, kv_heads = text.num_attention_heads, max(text.num_key_value_heads, size)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_pass = batch_size * seq_len // size * head_dim * (2 * heads + 2 * kv_heads)
    return text.num_hidden_layers * (3 if activation_checkpointing else 2) * per_pass


def local_pattern(pattern: Pattern, num_heads: int, size: int, rank: int) -> Pattern:
    """``pattern`` on the heads Ulysses gives position ``rank`` of a group of ``size``: ``[rank H/N, (rank+1) H/N)``."""
    if num_heads % size:
        raise ValueError(f"sequence_parallel={size}: num_attention_heads={num_heads} is not divisible by {size}")
    return dataclasses.replace(pattern, heads=(rank * num_heads // size, num_heads))


@contextlib.contextmanager
def training_attention(model: Any, pattern: Pattern, size: int = 1) -> Iterator[Any]:
    """:func:`~sinklora.hf.attention.use_attention` for a training run on ``size`` processes per sequence.

    With ``size`` > 1 the pattern holds this rank's global head indices, and on exit what DeepSpeed's
    registration changed in place is restored: the registry entry of :data:`ATTENTION` (it puts its wrapper
    there) and each attention module's ``num_key_value_groups`` (it rewrites it when it repeats KV heads);
    DeepSpeed's sequence-parallel groups are released, so a later run in this process can build its own.
    """
    if size == 1:
        with use_attention(model, pattern) as base:
            yield base
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = base_model(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    local = local_pattern(pattern, config.num_attention_heads, size, _rank_in_group(size))
    _init_deepspeed_comm()
    register()
    core = ALL_ATTENTION_FUNCTIONS[ATTENTION]
    modules = attention_modules(base)
    kv_groups = [m.num_key_value_groups for m in modules]
    logger.info("sequence parallelism: rank %d holds heads %d..%d of %d", runtime.rank(), local.heads[0],
                local.heads[0] + config.num_attention_heads // size - 1, config.num_attention_heads)
    try:
        with use_attention(model, local) as base:
            yield base
    finally:
        ALL_ATTENTION_FUNCTIONS[ATTENTION] = core
        for m, groups in zip(modules, kv_groups):
            m.num_key_value_groups = groups
        _release_groups()


def _init_deepspeed_comm() -> None:
    """On CPU the Trainer starts torch.distributed (gloo) without DeepSpeed's comm layer, which DeepSpeed's
    group set-up asserts before ``deepspeed.initialize`` would start it: start it on the same process group."""
    import torch.distributed
    from deepspeed import comm

    if torch.distributed.is_initialized() and not comm.is_initialized():
        comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def _release_groups() -> None:
    """Forget DeepSpeed's sequence-parallel groups (it refuses to build them twice in one process)."""
    import sys

    state = sys.modules.get("deepspeed.runtime.sequence_parallel.parallel_state_sp")
    release = getattr(state, "_release_sequence_parallel_groups", None)
    if release is not None:
        release()
