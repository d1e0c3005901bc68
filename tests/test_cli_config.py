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


def test_yaml_syntax_errors_are_one_line_with_where_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [3\nlora:\n  r: 4\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"sinklora train: invalid configuration: config file {str(bad)!r}: line 3, column 5:")
    assert main(["eval", "passkey", "lengths=[64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("sinklora eval passkey: invalid configuration: override 'lengths=[64': line 1, column 12: "
                   "while parsing a flow sequence: expected ',' or ']', but got '<stream end>'")


def test_duplicate_yaml_keys_are_refused(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  max_steps: 3\n  learning_rate: 1e-4\n  max_steps: 30\n")
    with pytest.raises(ConfigError, match=r"dup.yaml': line 4, column 3: duplicate key 'max_steps' \(first at line 2"):
        load_config(ExtendConfig, dup)
    with pytest.raises(ConfigError, match="duplicate key 'r'"):
        load_config(ExtendConfig, overrides=["lora={r: 4, r: 8}"])


def test_help_into_a_closed_pipe_exits_quietly():
    """`sinklora train --help | head -3`: the reader leaves before the help is written."""
    import subprocess
    import sys

    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "sinklora.cli", "train", "--help"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # closed before the child writes: every write meets a broken pipe
        err = proc.stderr.read().decode()
        assert proc.wait() == 141 and "BrokenPipeError" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("group, subcommands", [("eval", ["ppl", "passkey", "ruler", "longbench"]), ("data", ["mix", "tasks"]),
                                                ("model", ["prepare"])])
def test_command_groups_list_their_subcommands(group, subcommands, capsys):
    assert main([group, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sinklora {group} SUBCOMMAND")
    assert [line.split()[0] for line in out.split("subcommands:\n")[1].split("\n\n")[0].splitlines()] == subcommands
    assert main([group]) == 2 and f"usage: sinklora {group} SUBCOMMAND" in capsys.readouterr().err
