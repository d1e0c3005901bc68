"""Adapters and exports outside sinklora: the adapter's model card loads it with plain transformers + peft
(fresh process, no sinklora), one sinklora call loads an adapter or an export, wrong-RoPE warnings,
exports that transformers 5.x and 4.57 read alike, and file permissions."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import logits_of, save_tiny_base

from sinklora.models import export, loading, lora

# the probe: 600 positions, beyond the tiny base's 256, so default RoPE and the extension disagree
PROBE = "torch.arange(600).remainder(256).unsqueeze(0)"
OLD_TRANSFORMERS = ["transformers==4.57.6", "tokenizers==0.22.2", "huggingface-hub==0.36.2"]


def _probe_logits(model) -> torch.Tensor:
    return logits_of(model, eval(PROBE))


def _run_fresh(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def test_model_card_code_loads_the_adapter_without_sinklora(trained_adapter, tmp_path):
    base, peft_model, adapter = trained_adapter
    card = (adapter / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "sinklora" in meta["tags"] and "long-context" in meta["tags"]
    assert meta["base_model"] == "base" and not Path(meta["base_model"]).is_absolute()
    assert str(tmp_path) not in card  # no local absolute path anywhere in the card
    assert "RoPE factor 3 (256 -> 700 tokens), rope_theta 10000" in " ".join(card.split())

    code = re.search(r"## Load with transformers.*?```python\n(.*?)```", card, re.S).group(1)
    code = re.sub(r"^base = .*$", f"base = {str(base)!r}", code, flags=re.M)
    code = re.sub(r"^adapter = .*$", f"adapter = {str(adapter)!r}", code, flags=re.M)
    out = tmp_path / "plain.pt"
    code += ("\nimport sys, torch\nwith torch.no_grad():\n"
             f"    torch.save(model(input_ids={PROBE}).logits, {str(out)!r})\n"
             "assert not [m for m in sys.modules if m.startswith('sinklora')], 'the card code imported sinklora'\n")
    _run_fresh(code)
    torch.testing.assert_close(torch.load(out), _probe_logits(peft_model), atol=1e-5, rtol=0)

    # what the card warns about: the same adapter on the unextended base computes other logits
    from transformers import AutoModelForCausalLM

    plain = lora.load_adapter(AutoModelForCausalLM.from_pretrained(base), adapter)
    assert (_probe_logits(plain) - _probe_logits(peft_model)).abs().max() > 1e-2


def test_one_call_loads_an_adapter_folder_or_an_export(trained_adapter, tmp_path):
    base, peft_model, adapter = trained_adapter
    reference = _probe_logits(peft_model)
    model, tokenizer = loading.load_model(adapter)  # base and extension come from the folder's record
    assert model.get_base_model().config.max_position_embeddings == 700
    torch.testing.assert_close(_probe_logits(model), reference, atol=1e-6, rtol=0)
    assert tokenizer.eos_token == "<|endoftext|>"
    merged = export.export_merged(base, adapter, tmp_path / "merged")
    model, _ = loading.load_model(merged)
    torch.testing.assert_close(_probe_logits(model), reference, atol=1e-5, rtol=0)


def test_wrong_rope_is_warned_about(trained_adapter, tmp_path, caplog):
    base, _, adapter = trained_adapter
    with caplog.at_level(logging.WARNING, logger="sinklora.models.loading"):
        loading.load_model(base, adapter=adapter)
    assert not caplog.records  # the adapter's own base and record: nothing to say
    with caplog.at_level(logging.WARNING, logger="sinklora.models.loading"):
        loading.load_model(base, adapter=adapter, context_len=2000)
    assert "context_len=2000 sets RoPE factor 8, but adapter=" in caplog.text and "factor 3" in caplog.text
    caplog.clear()
    other = save_tiny_base(tmp_path / "other", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with caplog.at_level(logging.WARNING, logger="sinklora.models.loading"):
        loading.load_model(other, adapter=adapter)
    assert "rope_theta=10000" in caplog.text and "rope_theta=500000" in caplog.text


def test_files_get_the_usual_permissions(trained_adapter, tmp_path):
    base, _, adapter = trained_adapter
    old = os.umask(0o022)
    try:
        merged = export.export_merged(base, adapter, tmp_path / "merged")
        again = lora.save_adapter(loading.load_model(base, adapter=adapter)[0], tmp_path / "adapter2")
    finally:
        os.umask(old)
    assert (merged.stat().st_mode & 0o777) == 0o755
    for f in [*merged.iterdir(), *again.iterdir()]:
        assert (f.stat().st_mode & 0o777) == 0o644, f  # safetensors alone writes 0600


def test_export_config_carries_both_rope_forms_and_loads_without_warnings(trained_adapter, tmp_path):
    base, peft_model, adapter = trained_adapter
    merged = export.export_merged(base, adapter, tmp_path / "merged")
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0}
    assert cfg["rope_scaling"] == {"rope_type": "linear", "type": "linear", "factor": 3.0}
    assert cfg["rope_theta"] == 10000.0 and cfg["max_position_embeddings"] == 700
    assert cfg["original_max_position_embeddings"] == 256
    assert json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    out = tmp_path / "v5.pt"
    proc = _run_fresh(_reader_script(merged, out))
    assert "Unrecognized keys" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr
    torch.testing.assert_close(torch.load(out)["logits"], _probe_logits(peft_model), atol=1e-5, rtol=0)


def _reader_script(folder: Path, out: Path) -> str:
    return f"""
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained({str(folder)!r})
with torch.no_grad():
    logits = model(input_ids={PROBE}).logits
ids = tok("The pass key is 4711.<|im_start|>x<|im_end|>")["input_ids"]
torch.save({{"version": transformers.__version__, "logits": logits, "ids": ids}}, {str(out)!r})
"""


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def transformers_457(request) -> Path:
    """transformers 4.57 (with the tokenizers / hub it needs) installed with ``pip --target`` into the pytest
    cache, once; torch and the rest come from this environment."""
    target = Path(request.config.cache.mkdir("transformers-4.57.6"))
    if (target / "transformers" / "__init__.py").is_file():
        return target
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *OLD_TRANSFORMERS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        if not _pypi_reachable():
            pytest.skip("PyPI is unreachable: cannot install transformers 4.57 for the old-reader test")
        pytest.fail(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-3000:]}")
    return target


def test_export_reads_alike_in_transformers_4_57(trained_adapter, tmp_path, transformers_457):
    from transformers import AutoTokenizer

    base, peft_model, adapter = trained_adapter
    merged = export.export_merged(base, adapter, tmp_path / "merged")
    old = tmp_path / "v4.pt"
    _run_fresh(_reader_script(merged, old), env={**os.environ, "PYTHONPATH": str(transformers_457)})
    old = torch.load(old)
    assert old["version"] == "4.57.6"
    # the tokenizer reads alike (5.x's class name alone is unknown to 4.57)
    text = "The pass key is 4711.<|im_start|>x<|im_end|>"
    assert old["ids"] == AutoTokenizer.from_pretrained(merged)(text)["input_ids"]
    # and so does the model: 4.57 alone falls back to default RoPE and theta 10000 without rope_scaling
    torch.testing.assert_close(old["logits"], _probe_logits(peft_model), atol=1e-5, rtol=0)
