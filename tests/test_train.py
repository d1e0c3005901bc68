"""`sinklora train` on a tiny model: learning, what is saved, kill-and-resume, refusals, 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama, tiny_tokenizer
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
    # the tiny model ties lm_head to the embedding: peft saves the tied copy too, and it must be identical
    head = saved.pop("base_model.model.lm_head.weight", None)
    assert head is None or torch.equal(head, embed[0])
    assert saved and all(("lora_A" in k or "lora_B" in k or "embed_tokens" in k or "norm" in k) for k in saved)
    assert len(embed) == 1 and sum("norm" in k for k in saved) == 5  # 2 layers x 2 + final
    assert sum("lora_" in k for k in saved) == 2 * 4 * 2  # layers x q/k/v/o x A/B
    assert not any("mlp" in k for k in saved)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    # plain peft loads it, on a base built from the recorded (extended) config
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sinklora.models.loading import load_config as load_model_config

    config = load_model_config(assets / "model", adapter=tmp_path / "run")
    assert config.rope_parameters["factor"] == 2.0 and config.max_position_embeddings == 256
    base = AutoModelForCausalLM.from_pretrained(assets / "model", config=config)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "run")
    ids = torch.randint(0, 256, (1, 40))
    assert torch.isfinite(peft_model(ids).logits).all()


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


def test_kill_and_resume_reaches_the_uninterrupted_state(assets, tmp_path):
    run(_cfg(assets, tmp_path / "straight"))
    script = _KILL_SCRIPT.format(tests=str(REPO / "tests"), assets=str(assets), out=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="resume=true"):
        run(_cfg(assets, tmp_path / "killed"))  # refuses to clobber the interrupted run
    run(_cfg(assets, tmp_path / "killed", resume=True))
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


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
