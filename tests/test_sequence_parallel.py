"""`train.sequence_parallel=N` (DeepSpeed Ulysses with sinklora's attention as the core attention).

- Exactness: 2 CPU processes (gloo, ZeRO-2) against one process, the same steps: losses, gradient norms
  and the adapter, for sf (with a resume in the middle), s2 (MQA: KV heads repeated across the ranks),
  full, and an SFT run of packed rows with gradient accumulation (token-weighted loss). One torchrun
  launch runs them all (DeepSpeed's start-up dominates), the one-process references run here.
- Fast checks: a rank's heads of the whole model (the shifted-head rule on global indices, GQA / MQA
  head layouts as Ulysses hands them out), the batches Ulysses shards, refusals, and that what
  DeepSpeed changes in place is restored.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_llama_config, tiny_tokenizer
from safetensors.torch import load_file

from sinklora.attention import Pattern, sparse_attention
from sinklora.config import ConfigError, load_config
from sinklora.hf import sequence_parallel as sp
from sinklora.settings import TrainingConfig
from sinklora.train import extend, sft
from sinklora.train.configs import ExtendConfig, SFTConfig

REPO = Path(__file__).resolve().parents[1]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs DeepSpeed (README: 'Longer than one GPU' "
                                                                "shows the CPU install; .ci/run installs it)")


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- a rank's heads ------------------------------------------------------------------------------


def _ulysses_slice(x: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """The heads of ``x`` (B, H, L, D) that rank ``rank`` of ``size`` holds after Ulysses' all-to-all:
    contiguous blocks of H / N; KV heads fewer than N are first repeated up to N (repeat_interleave)."""
    heads = x.shape[1]
    if heads < size:
        x = x.repeat_interleave(size // heads, dim=1)
    per_rank = x.shape[1] // size
    return x[:, rank * per_rank:(rank + 1) * per_rank]


@pytest.mark.parametrize("name", ["sf", "s2", "s2_roll", "full"])
@pytest.mark.parametrize("heads,kv_heads,size", [(4, 2, 2), (4, 1, 2), (8, 2, 4), (8, 8, 4), (6, 3, 3), (4, 2, 4)])
def test_each_rank_computes_its_heads_of_the_whole_model(name, heads, kv_heads, size):
    torch.manual_seed(0)
    B, L, D = 2, 40, 8
    q, k, v = torch.randn(B, heads, L, D), torch.randn(B, kv_heads, L, D), torch.randn(B, kv_heads, L, D)
    pattern = Pattern(name) if name == "full" else Pattern(name, group_size=8)
    whole = sparse_attention(q, k, v, pattern)
    for rank in range(size):
        local = sp.local_pattern(pattern, heads, size, rank)
        part = sparse_attention(*(_ulysses_slice(t, size, rank) for t in (q, k, v)), local)
        torch.testing.assert_close(part, _ulysses_slice(whole, size, rank), rtol=1e-5, atol=1e-6)
    if name != "full":  # control: without their global head indices some rank computes other heads' pattern
        assert any(not torch.allclose(sparse_attention(*(_ulysses_slice(t, size, rank) for t in (q, k, v)), pattern),
                                      _ulysses_slice(whole, size, rank), atol=1e-3) for rank in range(size))


def test_pattern_heads_are_validated_and_kept_out_of_the_key():
    assert Pattern("sf", heads=[2, 4]).heads == (2, 4)
    assert Pattern("sf", heads=(2, 4)).key == "sf"
    spec = Pattern("sf", group_size=8, heads=(2, 4)).resolve(32, 2)
    assert spec.first_shifted_head == 0  # global heads 2, 3 of 4 are both shifted
    assert Pattern("sf", group_size=8, heads=(0, 4)).resolve(32, 2).first_shifted_head == 2  # heads 0, 1: neither
    for bad in ((4, 4), (-1, 4), (1,), (True, 4)):
        with pytest.raises(ValueError, match="heads="):
            Pattern("sf", heads=bad)
    with pytest.raises(ValueError, match="head_offset=2 with 4 local heads"):  # Ulysses bypassed: all heads
        Pattern("sf", group_size=8, heads=(2, 4)).resolve(32, 4)


# ---- batches, refusals, formula, restoring -------------------------------------------------------


def test_batches_carry_positions_and_split_into_equal_shards():
    def collate(items):
        return {"input_ids": torch.tensor(items), "labels": torch.tensor(items)}

    batch = sp.ShardableBatches(collate, 4, pad_id=9)([[1, 2, 3, 4, 5], [6, 7, 8, 9, 1]])
    assert batch["input_ids"].shape == (2, 8) and (batch["input_ids"][:, 5:] == 9).all()
    assert (batch["labels"][:, 5:] == -100).all() and torch.equal(batch["labels"][:, :5], batch["input_ids"][:, :5])
    assert torch.equal(batch["position_ids"], torch.arange(8).expand(2, 8))  # a row: positions run on

    def packed(items):  # two documents in one row; the pads must not join the second one
        return {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "labels": torch.tensor([[-100, 2, 3, -100, 5]]),
                "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}

    batch = sp.ShardableBatches(packed, 2, pad_id=0)([None])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]] and batch["labels"][0, -1] == -100
    same = sp.ShardableBatches(collate, 2, pad_id=0, length=16)([[1, 2, 3, 4]])  # not on gloo: no padding to 16
    assert same["input_ids"].shape == (1, 4)


def test_refusals_name_the_setting_and_the_fix():
    config = tiny_llama_config()  # 4 heads, 2 KV heads
    assert sp.problems(1, config, seq_len=7, world_size=1) == []
    found = " | ".join(sp.problems(3, config, seq_len=128, world_size=3))
    assert "num_attention_heads=4 is not divisible by 3" in found and "[2, 4]" in found
    found = " | ".join(sp.problems(2, tiny_llama_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3), world_size=2))
    assert "num_key_value_heads=3" in found
    found = " | ".join(sp.problems(2, config, seq_len=127, world_size=3, varying_batch_size=2))
    assert "train_len=127 is not a multiple of 2" in found and "use train_len=126" in found
    assert "with 3 process(es)" in found and "accelerate launch --num_processes 2" in found
    assert "train.batch_size=2" in found
    errors = TrainingConfig(sequence_parallel=2).validate() + TrainingConfig(sequence_parallel=0).validate()
    assert any("add train.deepspeed=configs/deepspeed/zero2.json" in e for e in errors)
    assert any("sequence_parallel=0: must be >= 1" in e for e in errors)


def test_all_to_all_elements_from_the_shapes():
    config = tiny_llama_config(num_hidden_layers=3)  # 4 heads of 16, 2 KV heads
    # per layer and pass: q (64 tokens x 4 heads) + k, v (64 x 2 each) + output (64 x 4), x 16 dims
    assert sp.all_to_all_elements(config, 128, 2, activation_checkpointing=False) == 3 * 2 * 64 * 16 * (4 + 2 + 2 + 4)
    # 4 ranks: the 2 KV heads are repeated to 4; recomputation adds a forward
    assert sp.all_to_all_elements(config, 128, 4) == 3 * 3 * 32 * 16 * (4 + 4 + 4 + 4)
    assert sp.all_to_all_elements(config, 128, 1) == 0


@needs_deepspeed
def test_what_deepspeed_changes_in_place_is_restored(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from sinklora.hf.attention import ATTENTION, attention_modules, register

    monkeypatch.setenv("RANK", "1")
    model = tiny_llama(num_key_value_heads=1)
    register()
    core = ALL_ATTENTION_FUNCTIONS[ATTENTION]
    with pytest.raises(RuntimeError, match="boom"):
        with sp.training_attention(model, Pattern("sf"), 2):
            module = attention_modules(model)[0]
            assert module._sinklora_state.pattern.heads == (2, 4)  # rank 1 of 2 holds heads 2, 3 of 4
            ALL_ATTENTION_FUNCTIONS[ATTENTION] = lambda *a, **kw: None  # as DeepSpeed's registration does
            module.num_key_value_groups = 1  # as Ulysses does when it repeats KV heads
            raise RuntimeError("boom")
    assert ALL_ATTENTION_FUNCTIONS[ATTENTION] is core
    assert all(m.num_key_value_groups == 4 for m in attention_modules(model))
    assert all(getattr(m, "_sinklora_state", None) is None for m in attention_modules(model))
    assert model.config._attn_implementation == "sdpa"


def test_train_refuses_a_size_the_model_cannot_split(tmp_path):
    model = tmp_path / "model"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    doc = tmp_path / "doc.txt"
    doc.write_text("To be, or not to be: that is the question. " * 40)
    cfg = load_config(ExtendConfig, overrides={
        "model": str(model), "data": str(doc), "output_dir": str(tmp_path / "out"), "target_len": 256,
        "train_len": 128, "attention": {"group_size": 32}, "eval": {"enabled": False},
        "train": {"sequence_parallel": 3, "deepspeed": str(REPO / "configs/deepspeed/zero2.json")}})
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by 3"):
        extend.run(cfg)
    assert not (tmp_path / "out").exists()  # refused before the output folder or the model


# ---- 2 processes against 1 -----------------------------------------------------------------------

STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("sp")
    for name, kv in (("gqa", 2), ("mqa", 1)):
        tiny_llama(max_position_embeddings=128, num_key_value_heads=kv).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    rng, words = random.Random(0), "the quick brown fox jumps over a lazy dog by the river bank".split()
    (root / "text").mkdir()
    for i in range(4):  # different rows, so the data order matters
        (root / "text" / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)))
    records = [{"instruction": "What is the capital of France?", "input": "x " * (3 * i), "output": "Paris" * (1 + i % 3)}
               for i in range(12)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _runs(assets: Path, out: Path) -> dict[str, list]:
    """name -> [[command, overrides], ...] as the 2-process launch runs them."""
    train = {"data": str(assets / "text"), "target_len": 256, "train_len": 128, "eval": {"enabled": False},
             "train": {"max_steps": STEPS, "learning_rate": 5e-3, "warmup_steps": 0, "save_steps": STEPS, "seed": 3}}

    def cfg(base, model, output, **changes):
        c = copy.deepcopy(base)
        c.update(model=str(assets / model), output_dir=str(out / output))
        for key, value in changes.items():  # a section's keys are merged, other values replaced
            if isinstance(value, dict):
                c.setdefault(key, {}).update(value)
            else:
                c[key] = value
        return c

    first_half = cfg(train, "gqa", "sf", attention={"pattern": "sf", "group_size": 32}, train={"max_steps": 2, "save_steps": 2})
    resumed = cfg(train, "gqa", "sf", attention={"pattern": "sf", "group_size": 32},
                  train={"max_steps": 4, "save_steps": 2}, resume=True)
    sft_run = {"data": str(assets / "sft.jsonl"), "batching": "packed", "max_len": 120, "target_len": 256,
               "attention": {"pattern": "sf", "group_size": 16},
               "train": {"max_steps": 2, "grad_accum": 2, "learning_rate": 5e-3, "warmup_steps": 0, "seed": 3,
                         "activation_checkpointing": False}}
    return {
        "sf": [["train", first_half], ["train", resumed]],  # a checkpoint at step 2, then resumed to step 4
        "s2": [["train", cfg(train, "mqa", "s2", attention={"pattern": "s2", "group_size": 32})]],
        "full": [["train", cfg(train, "gqa", "full", attention={"pattern": "full"})]],
        "sft": [["sft", cfg(sft_run, "gqa", "sft")]],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("sp-runs")
    runs = [[command, {**o, "train": {**o["train"], "sequence_parallel": 2,
                                       "deepspeed": str(REPO / "configs/deepspeed/zero2.json")}}]
            for pair in _runs(assets, out).values() for command, o in pair]
    (out / "runs.json").write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "sp_driver.py"), str(out / "runs.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    # the first DeepSpeed run on a machine compiles its shared-memory comm op (minutes on 2 busy cores)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _history(out: Path) -> list[tuple[int, float, float]]:
    rows = json.loads((out / "log_history.json").read_text())
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


@needs_deepspeed
@pytest.mark.parametrize("name", ["sf", "s2", "full", "sft"])
def test_two_processes_train_like_one(name, assets, two_processes, tmp_path):
    """Losses, gradient norms (the gradient's scale: transformers' own SP loss makes it N x) and adapter."""
    command, overrides = _runs(assets, two_processes)[name][-1]
    one = {**overrides, "output_dir": str(tmp_path / "one"), "resume": False}
    if command == "sft":
        sft.run(load_config(SFTConfig, overrides=one))
    else:
        extend.run(load_config(ExtendConfig, overrides=one))  # sf: 4 straight steps, no interruption
    two_out = Path(overrides["output_dir"])
    got, want = _history(two_out), _history(tmp_path / "one")
    assert [s for s, _, _ in got] == [s for s, _, _ in want] == list(range(1, overrides["train"]["max_steps"] + 1))
    for (_, loss2, norm2), (_, loss1, norm1) in zip(got, want):
        assert loss2 == pytest.approx(loss1, rel=1e-5) and norm2 == pytest.approx(norm1, rel=1e-4)
    a, b = load_file(two_out / "adapter_model.safetensors"), load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # Adam's first steps amplify float noise in rarely seen embedding rows: compare norms
        assert (a[key] - b[key]).norm() <= 1e-4 * b[key].norm(), key
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
