"""The README's library example runs as written (on a tiny model), and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import tiny_llama

from sinklora.cli import COMMANDS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs_as_written():
    (block,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    q, k, v = (torch.randn(1, h, 32, 8) for h in (4, 2, 2))
    scope = {"model": model, "input_ids": ids, "inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
             "q": q, "k": k, "v": v}
    exec(compile(block, str(README), "exec"), scope)
    assert scope["mask"].shape == (4, 32, 32) and scope["out"].shape[1] == 48 + 64
    assert scope["cache"].stats()["evicted_tokens"] > 0 and model.config._attn_implementation == "sdpa"


def test_every_command_in_the_readme_exists():
    text = README.read_text()
    used = set(re.findall(r"`sinklora ((?:eval |data |model )?[a-z]+)", text))
    assert used and used <= set(COMMANDS), used - set(COMMANDS)
