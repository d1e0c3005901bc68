"""The CLI and typed configs: shipped YAML files validate, overrides, errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sinklora.cli import COMMANDS, main
from sinklora.config import ConfigError, load_config, parse_overrides
from sinklora.train.configs import CompareConfig, ExtendConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("extend-*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_validate(path):
    cfg = load_config(ExtendConfig, path)
    assert cfg.target_len and cfg.attention.check_length(cfg.train_len or cfg.target_len) == []


def test_shipped_compare_and_deepspeed_configs():
    load_config(CompareConfig, CONFIGS / "compare-smollm2-16k.yaml")
    for p in (CONFIGS / "deepspeed").glob("*.json"):
        assert json.loads(p.read_text())["zero_optimization"]["stage"] in (2, 3)
    for p in (CONFIGS / "accelerate").glob("*.yaml"):
        assert yaml.safe_load(p.read_text())["distributed_type"] in ("DEEPSPEED", "FSDP")


def test_overrides_types_and_all_errors_at_once():
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=x"]) == {"a": {"b": 3}, "c": [1, 2], "d": "x"}
    cfg = load_config(ExtendConfig, overrides=["train.max_steps=7", "attention.pattern=s2", "eval.passkey_depths=0.1,0.9"])
    assert cfg.train.max_steps == 7 and cfg.attention.pattern == "s2" and cfg.eval.passkey_depths == [0.1, 0.9]
    with pytest.raises(ConfigError) as err:
        load_config(ExtendConfig, overrides=["attention.pattern=sff", "train.batch_size=zero", "lora.r=0"])
    msg = str(err.value)
    assert "attention.pattern='sff'" in msg and "did you mean 'sf'" in msg
    assert "train.batch_size='zero': expected an integer" in msg
    assert "r=0" in msg


def test_cli_help_and_errors(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "attention.pattern" in out and "train.learning_rate" in out
    assert main(["train", "attention.sink_tokens=-1", "--data", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "data='/nonexistent'" in err
    assert main(["no-such-command"]) == 2


def test_every_command_module_exposes_config_and_main():
    import importlib

    for words, module in COMMANDS.items():
        mod = importlib.import_module(module)
        assert hasattr(mod, "CONFIG") and callable(mod.main), words
