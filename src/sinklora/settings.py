"""Config sections that several commands share: the model to load, LoRA+, training attention, the
optimiser, a KV cache, a chat session. Typed dataclasses (see :mod:`sinklora.config`), each default
from :mod:`sinklora.defaults`; torch-free, so ``sinklora COMMAND --help`` stays instant.

A section turns into the library object it describes (``AttentionConfig.build() -> Pattern``,
``CacheOptions.policy() -> KVPolicy``) so validation and the run use one constructor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sinklora.config import option
from sinklora.defaults import (
    CACHE_AUTO_POLICY,
    CACHE_BUDGET_FLOOR,
    CACHE_SLACK,
    DEFAULT_MODEL,
    DEFAULT_SYSTEM_PROMPT,
    GROUP_RATIO,
    HEAVY_RATIO,
    LEARNING_RATE,
    SHIFTED_HEAD_FRACTION,
    WARMUP_STEPS,
)

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
CachePolicyName = Literal["auto", "full", "local", "sink", "h2o", "snapkv", "pyramidkv", "adakv"]


@dataclass
class ModelOptions:
    """Which model to load, and where (every command that loads a model for inference)."""

    model: str = option(DEFAULT_MODEL, "model alias, local Hugging Face folder (e.g. a `sinklora export`), hub id, "
                                        "or an adapter folder (a `sinklora train` output_dir: its base + adapter)")
    adapter: str | None = option(None, "LoRA/LoRA+ adapter folder (e.g. a `sinklora train` output_dir) to apply")
    dtype: Dtype = option("auto", "weights dtype; auto = as the checkpoint stores it")
    device: str = option("auto", "torch device (cpu, cuda, cuda:1); auto = cuda when available, else cpu")

    def validate(self) -> list[str]:
        errors = []
        if not self.model.strip():
            errors.append("model='': give a model alias, a local folder or a hub id")
        if self.adapter is not None and not (Path(self.adapter).expanduser() / "adapter_config.json").is_file():
            errors.append(f"adapter={self.adapter!r}: no adapter_config.json there; give a trained adapter folder "
                          "(a `sinklora train` or `sinklora sft` output_dir) or omit it")
        return errors

    def load(self, **kwargs: Any) -> tuple[Any, Any]:
        """``(model, tokenizer)`` in eval mode, through the one loader (:func:`sinklora.models.loading.load_model`)."""
        from sinklora.models.loading import load_model

        model, tokenizer = load_model(self.model, adapter=self.adapter, dtype=self.dtype, device=self.device, **kwargs)
        return model.eval(), tokenizer


@dataclass
class AttentionConfig:
    """The training attention pattern (docs/method.md §2); evaluation always uses full attention."""

    pattern: Literal["sf", "s2", "s2_roll", "full"] = option("sf", "training attention (evaluation always uses full)")
    group_ratio: float = option(GROUP_RATIO, "group size as a fraction of the training length (LongLoRA: 1/4)")
    group_size: int | None = option(None, "group size in tokens (overrides group_ratio)")
    sink_tokens: int | None = option(None, "global sink tokens (default 4 for sf, 0 otherwise)")
    shifted_head_fraction: float = option(SHIFTED_HEAD_FRACTION,
                                          "fraction of heads whose groups are shifted by half a group")

    def build(self) -> Any:
        """The :class:`sinklora.attention.Pattern` (raises ValueError naming the bad setting)."""
        from sinklora.attention.pattern import Pattern

        size = {"group_size": self.group_size} if self.group_size is not None else {"group_ratio": self.group_ratio}
        return Pattern(self.pattern, sink_tokens=self.sink_tokens,
                       shifted_head_fraction=self.shifted_head_fraction, **size)

    def validate(self) -> list[str]:
        try:
            self.build()
        except ValueError as e:
            return [str(e)]
        return []

    def check_length(self, seq_len: int) -> list[str]:
        """Errors for these settings at a training length (group size vs length vs sinks)."""
        try:
            return [f"attention: {p}" for p in self.build().problems_at(seq_len)]
        except ValueError as e:
            return [f"attention: {e}"]


@dataclass
class TrainingConfig:
    max_steps: int | None = option(None, "optimizer steps (default: the preset's for train, one epoch for sft)")
    batch_size: int = option(1, "sequences per device per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    learning_rate: float | None = option(None, f"peak learning rate (paper: {LEARNING_RATE:g}; default: the "
                                               "preset's for train, the paper's for sft)")
    warmup_steps: int | None = option(None, f"linear warm-up steps, then constant (paper: {WARMUP_STEPS})")
    weight_decay: float = option(0.0, "AdamW weight decay (paper: 0)")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", "auto = bf16 on a GPU that supports it, else fp32")
    activation_checkpointing: bool = option(True, "recompute activations in backward (less memory)")
    logging_steps: int = option(1, "log loss and tokens/s every N steps")
    save_steps: int | None = option(None, "checkpoint every N steps (default: from the preset)")
    save_total_limit: int = option(2, "checkpoints kept (older ones are deleted)")
    seed: int = option(42, "random seed (data order, LoRA init)")
    deepspeed: str | None = option(None, "DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json)")
    sequence_parallel: int = option(1, "processes that share one sequence (DeepSpeed Ulysses: each holds 1/N of "
                                       "the tokens, then 1/N of the heads in attention); needs train.deepspeed")

    def validate(self) -> list[str]:
        errors = []
        for name in ("max_steps", "batch_size", "grad_accum", "logging_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                errors.append(f"{name}={value}: must be >= 1")
        if self.learning_rate is not None and not 0 < self.learning_rate < 1:
            errors.append(f"learning_rate={self.learning_rate}: must be in (0, 1), e.g. {LEARNING_RATE:g}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            errors.append(f"warmup_steps={self.warmup_steps}: must be >= 0")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            errors.append(f"deepspeed={self.deepspeed!r}: file not found (see configs/deepspeed/)")
        if self.sequence_parallel < 1:
            errors.append(f"sequence_parallel={self.sequence_parallel}: must be >= 1 (1 = off)")
        elif self.sequence_parallel > 1 and self.deepspeed is None:
            errors.append(f"sequence_parallel={self.sequence_parallel} runs under DeepSpeed (Ulysses): add "
                          "train.deepspeed=configs/deepspeed/zero2.json (or zero3.json)")
        return errors


@dataclass
class CacheOptions:
    """A KV-cache policy for generation (docs/method.md §3)."""

    cache: CachePolicyName = option("auto", f"KV-cache policy (docs/method.md §3); auto = full without a budget, "
                                            f"{CACHE_AUTO_POLICY} with one")
    budget: str | None = option(None, "KV budget: tokens (512) or a ratio of the first prompt (0.2, 20%)")
    budget_floor: int = option(CACHE_BUDGET_FLOOR, "a ratio budget keeps at least this many tokens (a short chat "
                                                   "prompt keeps its question); 0: the exact ratio")
    sink_tokens: int | None = option(None, "sink tokens always kept (default: 4 for sink, 0 for the others)")
    heavy_ratio: float | None = option(None, f"h2o/snapkv/pyramidkv/adakv: share of the non-sink budget for heavy "
                                             f"hitters (default {HEAVY_RATIO:g})")
    slack: int | None = option(None, f"tokens the cache may grow past its budget before it evicts down to it at "
                                     f"once (default {CACHE_SLACK}; 0 with positions=rank); 0 evicts every step")
    positions: Literal["absolute", "rank"] = option("absolute", "RoPE positions of kept tokens: absolute, or rank "
                                                    "within the cache (StreamingLLM: streams past the trained length)")

    def policy(self) -> Any:
        """The :class:`sinklora.cache.KVPolicy` (raises ValueError naming the bad setting)."""
        from sinklora.cache.policies import check_positions, check_slack, make_policy

        policy = make_policy(self.cache, self.budget, sink_tokens=self.sink_tokens, heavy_ratio=self.heavy_ratio,
                             budget_floor=self.budget_floor)
        check_positions(self.positions, policy.name)
        check_slack(self.slack, policy, self.positions)
        return policy

    def validate(self) -> list[str]:
        try:
            self.policy()
        except ValueError as e:
            return [f"cache={self.cache!r}: {e}"]
        return []

    @property
    def name(self) -> str:
        """``full``, ``h2o@0.2``, ``sink@512``: this setting in tables and file names."""
        from sinklora.cache.policies import policy_name

        name = policy_name(self.cache, self.budget)
        return name if self.budget is None else f"{name}@{self.budget}"

    def make(self, model: Any) -> Any:
        """A fresh :class:`sinklora.hf.cache.PolicyCache` for one request on ``model``."""
        from sinklora.hf.cache import make_cache

        return make_cache(model, self.policy(), positions=self.positions, slack=self.slack)


@dataclass
class SessionOptions(ModelOptions, CacheOptions):
    """What a chat session needs: model, cache policy, decoding (``chat`` and ``serve``)."""

    system_prompt: str = option(DEFAULT_SYSTEM_PROMPT, "system message; empty for none")
    context: str | None = option(None, "text file (a long document) put before the first question")
    max_new_tokens: int = option(256, "most tokens per reply")
    temperature: float = option(0.0, "0 = greedy; > 0 samples")
    top_p: float = option(1.0, "nucleus sampling mass (with temperature > 0)")
    seed: int = option(0, "sampling seed (`chat`; a server request gives its own, else a random one)")
    prefill_chunk: int = option(512, "prompt tokens per forward step; Ctrl-C or a client's disconnect stops "
                                     "generation between two steps")

    def validate(self) -> list[str]:
        errors = ModelOptions.validate(self) + CacheOptions.validate(self)
        if self.prefill_chunk < 1:
            errors.append(f"prefill_chunk={self.prefill_chunk}: must be >= 1 token (e.g. 512)")
        if self.context is not None and not Path(self.context).is_file():
            errors.append(f"context={self.context!r}: no such file; give a text file or omit it")
        if self.max_new_tokens < 1:
            errors.append(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            errors.append(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p={self.top_p}: must be in (0, 1]")
        return errors


API_KEY_ENV = "SINKLORA_API_KEY"


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); brackets around IPv6 allowed."""
    import ipaddress

    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class ServerOptions:
    """Where ``sinklora serve`` listens, whom it answers, and how much it takes on."""

    host: str = option("127.0.0.1", "address to listen on; loopback by default (others need allow_remote=true "
                                    "and an api_key)")
    port: int = option(8000, "TCP port; 0 picks a free one")
    allow_remote: bool = option(False, "allow a non-loopback host (then api_key is required)")
    api_key: str | None = option(None, f"Bearer key every /v1 route requires (default: ${API_KEY_ENV} if set); "
                                       "required beyond loopback")
    allowed_hosts: list[str] = option(factory=list, help="Host header names accepted besides loopback ones and the "
                                      "bound address (DNS-rebinding guard); ['*'] accepts any")
    allowed_origins: list[str] = option(factory=list, help="browser origins allowed to call the API from other "
                                        "pages, e.g. [http://localhost:3000]; [] = the server's own page only")
    max_queue: int = option(8, "requests waiting for the model; more are answered 429 with Retry-After")
    max_body_bytes: int = option(4 * 2**20, "largest request body accepted (bytes); larger ones get 413")
    request_timeout: float = option(600.0, "seconds a request may take, queueing included; then it is stopped")
    max_requests: int = option(0, "stop after this many HTTP requests (0 = run until Ctrl-C); for scripts/tests")

    def key(self) -> str | None:
        """The API key: ``api_key``, else the environment's ``$SINKLORA_API_KEY``, else None."""
        import os

        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def validate(self) -> list[str]:
        errors = []
        if not self.host.strip():
            errors.append("host='': give an address to listen on, e.g. 127.0.0.1")
        elif not is_loopback(self.host):
            if not self.allow_remote:
                errors.append(f"host={self.host!r}: not a loopback address; set allow_remote=true (and an api_key) "
                              "to expose the server, or keep host=127.0.0.1")
            if not self.key():
                errors.append(f"host={self.host!r}: a server reachable beyond this machine needs an API key; set "
                              f"api_key=... or ${API_KEY_ENV}")
            if self.host.strip("[]") in ("0.0.0.0", "::") and not self.allowed_hosts:
                errors.append(f"host={self.host!r} listens on every address: name the host names clients use in "
                              "allowed_hosts (e.g. [myserver.lan, 192.168.1.5]), or allowed_hosts=['*']")
        if not 0 <= self.port <= 65535:
            errors.append(f"port={self.port}: must be in 0..65535 (0 = any free port)")
        bad = [o for o in self.allowed_origins if "://" not in o or o.endswith("/") or o.strip() == "*"]
        if bad:
            errors.append(f"allowed_origins={bad!r}: give origins as scheme://host[:port] without a path, e.g. "
                          "http://localhost:3000")
        for name, low in (("max_queue", 0), ("max_body_bytes", 1024), ("max_requests", 0)):
            if getattr(self, name) < low:
                errors.append(f"{name}={getattr(self, name)}: must be >= {low}")
        if not self.request_timeout > 0:
            errors.append(f"request_timeout={self.request_timeout}: must be > 0 seconds")
        return errors


@dataclass
class EvalModelOptions(ModelOptions):
    """Fields every eval command shares."""

    context_len: int | None = option(
        None, "extend RoPE to this length by linear position interpolation before evaluating (the untrained "
        "baseline); an adapter's own RoPE record is applied without it"
    )
    output_dir: str = option("outputs/eval", "folder for results.json, the plot and config.yaml")
    label: str | None = option(None, "series name in plots; default: model (+ adapter)")

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.context_len is not None and self.context_len < 1:
            errors.append(f"context_len={self.context_len}: must be a positive token count, or omit it")
        return errors

    def load(self, **kwargs: Any) -> tuple[Any, Any]:
        if self.context_len is not None:
            kwargs.setdefault("context_len", self.context_len)
        return super().load(**kwargs)
