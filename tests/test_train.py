"""`sinklora train` on a tiny model: learning, what is saved, kill-and-resume, refusals, 2 processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_llama, tiny_tokenizer
from safetensors.torch import load_file

from sinklora.config import ConfigError, load_config
from sinklora.train.configs import ExtendConfig
from sinklora.train.extend import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model, tok = tiny_llama(max_position_embeddings=128), tiny_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "data"
    data.mkdir()
    for i in range(6):  # one document repeated: a few steps must learn it
        (data / f"part{i}.txt").write_text("It is a truth universally acknowledged that a fox jumps. " * 40)
    return root


def _cfg(assets, out, **over) -> ExtendConfig:
    base = {
        "model": str(assets / "model"), "data": str(assets / "data"), "output_dir": str(out),
        "target_len": 256, "train_len": 128, "attention": {"group_size": 32},
        "train": {"max_steps": 6, "learning_rate": 5e-3, "warmup_steps": 0, "save_steps": 2, "seed": 3},
        "eval": {"enabled": False},
    }
    for key, value in over.items():
        section, _, name = key.rpartition(".")
        (base.setdefault(section, {}) if section else base)[name] = value
    return load_config(ExtendConfig, overrides=base)


def test_training_lowers_loss_and_saves_only_the_adapter(assets, tmp_path):
    result = run(_cfg(assets, tmp_path / "run"))
    summary = result["train"]
    assert summary["steps"] == 6
    assert summary["last_loss"] < summary["first_loss"] - 0.5
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    embed = [v for k, v in saved.items() if "embed_tokens" in k]
    # the tiny model ties lm_head to the embedding: the shared matrix is stored once
    assert "base_model.model.lm_head.weight" not in saved
    assert saved and all(("lora_A" in k or "lora_B" in k or "embed_tokens" in k or "norm" in k) for k in saved)
    assert len(embed) == 1 and sum("norm" in k for k in saved) == 5  # 2 layers x 2 + final
    assert sum("lora_" in k for k in saved) == 2 * 4 * 2  # layers x q/k/v/o x A/B
    assert not any("mlp" in k for k in saved)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    # the run folder loads in one call: base, extended RoPE and adapter
    from sinklora.models.loading import load_model

    peft_model, _ = load_model(tmp_path / "run")
    config = peft_model.get_base_model().config
    assert config.rope_parameters["factor"] == 2.0 and config.max_position_embeddings == 256
    ids = torch.randint(0, 256, (1, 40))
    assert torch.isfinite(peft_model(ids).logits).all()
    # a checkpoint is an adapter folder like the final one: tied tensors once, RoPE record, model card
    ckpt = tmp_path / "run" / "checkpoint-6"
    assert "base_model.model.lm_head.weight" not in load_file(ckpt / "adapter_model.safetensors")
    assert json.loads((ckpt / "sinklora_context.json").read_text())["max_position_embeddings"] == 256
    assert "## Load with transformers" in (ckpt / "README.md").read_text()
    assert load_model(ckpt)[0].get_base_model().config.rope_parameters["factor"] == 2.0


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from transformers import TrainerCallback
    from test_train import _cfg
    from pathlib import Path

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:  # checkpoint-4 is on disk; step 5 is lost
                os.kill(os.getpid(), signal.SIGKILL)

    from sinklora.train.extend import run
    run(_cfg(Path({assets!r}), {out!r}), callbacks=[Kill()])
    """
)


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory) -> dict:
    """The adapter of the uninterrupted 6-step run that resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(_cfg(assets, out))
    return load_file(out / "adapter_model.safetensors")


def _assert_same_adapter(expected: dict, folder: Path, **tol) -> None:
    got = load_file(folder / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], **(tol or {"rtol": 1e-5, "atol": 1e-6}))


def _run_killed(script: str, assets: Path, out: Path) -> None:
    code = script.format(tests=str(REPO / "tests"), assets=str(assets), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]


def test_kill_and_resume_reaches_the_uninterrupted_state(assets, tmp_path, straight):
    _run_killed(_KILL_SCRIPT, assets, tmp_path / "killed")
    assert (tmp_path / "killed" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="resume=true"):
        run(_cfg(assets, tmp_path / "killed"))  # refuses to clobber the interrupted run
    run(_cfg(assets, tmp_path / "killed", resume=True))
    _assert_same_adapter(straight, tmp_path / "killed")


# killed inside the save of checkpoint-4: adapter and optimizer written, RNG state and trainer_state.json not
_KILL_IN_SAVE_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from transformers import Trainer
    from test_train import _cfg
    from pathlib import Path

    save_rng = Trainer._save_rng_state
    def dying_save_rng(self, output_dir):
        if self.state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_rng(self, output_dir)
    Trainer._save_rng_state = dying_save_rng  # this test's simulated crash, in its own process

    from sinklora.train.extend import run
    run(_cfg(Path({assets!r}), {out!r}))
    """
)


def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(assets, tmp_path, straight, caplog):
    out = tmp_path / "killed"
    _run_killed(_KILL_IN_SAVE_SCRIPT, assets, out)
    ckpt = out / "checkpoint-4"
    assert (ckpt / "optimizer.pt").is_file() and not (ckpt / "trainer_state.json").exists()
    with caplog.at_level(logging.WARNING, logger="sinklora.train.checkpoints"):
        run(_cfg(assets, out, resume=True))
    assert "checkpoint-4 is incomplete (trainer_state.json (missing), rng_state.pth (missing))" in caplog.text
    _assert_same_adapter(straight, out)


def test_resume_verifies_checkpoints_and_the_saved_config_tells_the_truth(assets, tmp_path, straight, caplog):
    from sinklora.train.checkpoints import checkpoint_problems, last_checkpoint

    out = tmp_path / "run"
    run(_cfg(assets, out, **{"train.max_steps": 4}))
    assert checkpoint_problems(out / "checkpoint-4") == []
    (out / "checkpoint-4" / "optimizer.pt").unlink()  # the Trainer alone would resume with a fresh optimizer
    with caplog.at_level(logging.INFO):
        run(_cfg(assets, out, resume=True, **{"train.max_steps": 6}))
    assert "checkpoint-4 is incomplete (optimizer.pt (missing))" in caplog.text
    assert f"resuming from {out / 'checkpoint-2'}" in caplog.text
    _assert_same_adapter(straight, out)
    assert yaml.safe_load((out / "sinklora_config.yaml").read_text())["train"]["max_steps"] == 6

    # cut files are found as well as missing ones
    ckpt = out / "checkpoint-6"
    assert checkpoint_problems(ckpt) == []
    weights = ckpt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    optimizer = ckpt / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    assert checkpoint_problems(ckpt) == ["optimizer.pt (truncated)", "adapter_model.safetensors (truncated)"]
    weights.unlink()
    assert checkpoint_problems(ckpt)[0] == "adapter_model.safetensors (missing)"
    assert last_checkpoint(out) == out / "checkpoint-4"  # rewritten complete by the resumed run


def test_refusals_name_the_problem(assets, tmp_path):
    with pytest.raises(ConfigError, match="data='/nonexistent'"):
        _cfg(assets, tmp_path / "x", data="/nonexistent")
    with pytest.raises(ConfigError, match="unknown key 'train.max_step'"):
        load_config(ExtendConfig, overrides=["train.max_step=3"])
    with pytest.raises(ConfigError, match="train_len=512 > target_len=256"):
        run(_cfg(assets, tmp_path / "x", train_len=512))
    with pytest.raises(ConfigError, match="sink_tokens=40 >= group_size=32"):
        run(_cfg(assets, tmp_path / "x", **{"attention.sink_tokens": 40}))
    short = tmp_path / "short"
    short.mkdir()
    for i in range(3):
        (short / f"{i}.txt").write_text("tiny")
    with pytest.raises(ValueError, match="tokens"):
        run(_cfg(assets, tmp_path / "y", data=str(short)))
    run(_cfg(assets, tmp_path / "z", **{"train.max_steps": 1}))
    with pytest.raises(ValueError, match="different configuration"):
        run(_cfg(assets, tmp_path / "z", resume=True, **{"attention.pattern": "s2"}))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a sinklora run"):
        run(_cfg(assets, tmp_path / "foreign"))
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_every_data_source_is_checked_before_anything_is_written(assets, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="data='.*empty.jsonl': the file is empty"):
        _cfg(assets, out, data=str(tmp_path / "empty.jsonl"))
    with pytest.raises(ConfigError, match=r"eval\.length=-5: must be at least 64"):
        _cfg(assets, out, **{"eval.length": -5})
    doc = tmp_path / "doc.txt"
    doc.write_text((assets / "data" / "part0.txt").read_text())
    with pytest.raises(ConfigError, match="data='.*doc.txt' is one document.*eval.corpus"):
        _cfg(assets, out, data=str(doc), **{"eval.enabled": True})
    (tmp_path / "short").mkdir()
    for i in range(4):
        (tmp_path / "short" / f"{i}.txt").write_text("a short work. " * 10)
    with pytest.raises(ValueError, match="no held-out document has eval.length=256"):  # found before training now
        run(_cfg(assets, out, **{"eval.enabled": True, "eval.corpus": str(tmp_path / "short"), "eval.length": 256}))
    (tmp_path / "records.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="record 1 has no field 'text'"):
        run(_cfg(assets, out, data=str(tmp_path / "records.jsonl")))
    assert not out.exists()
    result = run(_cfg(assets, out, data=str(doc), **{"train.max_steps": 1}))  # one text file is a corpus
    assert result["train"]["steps"] == 1 and (out / "adapter_model.safetensors").is_file()


def test_report_compares_the_same_rows_and_explains_itself(assets, tmp_path):
    result = run(_cfg(assets, tmp_path / "run", **{
        "eval.enabled": True, "eval.length": 256, "eval.docs": 1, "eval.passkey_trials": 1,
        "eval.passkey_depths": [0.5], "eval.loss_rows": 3}))
    before, after = result["before"], result["after"]
    # the same 3 rows before and after: a repeated sentence is learnt, so their loss falls
    assert after["fixed_rows_loss"] < before["fixed_rows_loss"] - 0.5
    table = (tmp_path / "run" / "results.md").read_text()
    assert f"| training loss on 3 fixed training rows (sf attention) | {before['fixed_rows_loss']:.3f} |" in table
    assert "128 tokens past the model's 128-token pretraining context" in table
    assert "'0% of 1' means that one key was not retrieved" in table
    assert "first -> last does not compare" in table
    saved = json.loads((tmp_path / "run" / "before.json").read_text())
    assert saved["before"]["fixed_rows_loss"] == before["fixed_rows_loss"]


def test_non_causal_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=64)).save_pretrained(tmp_path / "bert")
    from sinklora.models.loading import load_config as load_model_config

    with pytest.raises(ValueError, match="bert"):
        load_model_config(tmp_path / "bert")


def test_two_processes_train_one_consistent_adapter(assets, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "sinklora.cli", "train", f"model={assets / 'model'}", f"data={assets / 'data'}",
           f"output_dir={out}", "target_len=256", "train_len=128", "attention.group_size=32",
           "train.max_steps=3", "train.learning_rate=5e-3", "train.save_steps=3", "eval.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_file(out / "adapter_model.safetensors")
    ckpt = load_file(out / "checkpoint-3" / "adapter_model.safetensors")
    assert saved.keys() == ckpt.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], ckpt[k])
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # training moved LoRA B off zero
    # one process with the same global batch (2 rows per step, as micro-batches) reaches the same adapter
    options = [a for a in cmd[cmd.index("train") + 1:] if not a.startswith("output_dir")]
    one = load_config(ExtendConfig, overrides=options + [f"output_dir={tmp_path / 'one'}", "train.grad_accum=2"])
    run(one)
    _assert_same_adapter(saved, tmp_path / "one")  # measured 4e-8; a different global batch: 1e-2
