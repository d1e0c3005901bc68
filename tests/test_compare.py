"""`sinklora compare` at smoke scale on a tiny model, and the improvement ratio."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from sinklora.config import ConfigError, load_config
from sinklora.data.corpora import load_documents
from sinklora.models.loading import load_model
from sinklora.settings import AttentionConfig
from sinklora.train.compare import improvement_ratio, method_dir, run
from sinklora.train.configs import CompareConfig, method_attention


def test_improvement_ratio_definition():
    assert improvement_ratio(10.0, 8.0, 6.0) == pytest.approx(0.5)  # half of full attention's gain
    assert improvement_ratio(10.0, 6.0, 6.0) == pytest.approx(1.0)
    assert improvement_ratio(10.0, 11.0, 6.0) == pytest.approx(-0.25)  # worse than no training
    assert improvement_ratio(6.0, 6.0, 6.0) is None  # full attention gained nothing: undefined


def test_method_variants_parse_and_validate():
    a = method_attention(AttentionConfig(group_ratio=0.125), "sf:sink_tokens=8,shifted_head_fraction=0")
    assert (a.pattern, a.sink_tokens, a.shifted_head_fraction, a.group_ratio) == ("sf", 8, 0.0, 0.125)
    with pytest.raises(ConfigError, match="methods entry 'sf:sinks=8'"):
        load_config(CompareConfig, overrides=["methods=[full,'sf:sinks=8']"])
    with pytest.raises(ConfigError, match="include 'full'"):
        load_config(CompareConfig, overrides=["methods=[s2,sf]"])


def test_compare_smoke(tmp_path):
    model, tok = tiny_llama(max_position_embeddings=128), tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "data").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"{i}.txt").write_text(f"Act {i}. The pass of time is a river of words. " * 40)
    cfg = load_config(CompareConfig, overrides={
        "model": str(tmp_path / "model"), "data": str(tmp_path / "data"), "output_dir": str(tmp_path / "cmp"),
        "target_len": 512, "original_len": 64, "train_len": 128, "attention": {"group_size": 32},
        "methods": ["full", "s2", "sf"],
        "train": {"max_steps": 2, "learning_rate": 5e-3, "warmup_steps": 0},
        "eval": {"length": 300, "docs": 1, "passkey_trials": 1, "passkey_depths": [0.5]},
    })
    report = run(cfg)
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"base (PI only)", "full", "s2", "sf"}
    assert len({r["ppl_docs"][0] for r in report["rows"]}) == 1  # every method on the same held-out document

    # every perplexity again, independently: each model's plain forward loss on the document's first 300 tokens
    (doc,) = [d for d in load_documents(str(tmp_path / "data"), "heldout") if d.name == rows["full"]["ppl_docs"][0]]
    ids = torch.tensor([tok(doc.text, add_special_tokens=False).input_ids[:300]])
    ppl = {}
    for method in rows:
        if method.startswith("base"):
            model, _ = load_model(tmp_path / "model", context_len=512, original_len=64)
        else:
            model, _ = load_model(tmp_path / "model", adapter=method_dir(cfg, method))
        with torch.no_grad():
            ppl[method] = math.exp(model(input_ids=ids, labels=ids).loss.item())
        assert rows[method]["ppl"] == pytest.approx(ppl[method], rel=1e-4)
    base = ppl["base (PI only)"]
    for m in ("full", "s2", "sf"):
        assert rows[m]["improvement_ratio"] == pytest.approx((base - ppl[m]) / (base - ppl["full"]), rel=1e-3)
        assert ppl[m] < base  # two steps on repeated text already help
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["budget"]["original_len"] == 64 and report["budget"]["factor"] == 8  # told 64, not the config's 128
    assert saved["meta"]["versions"]["torch"] and "64 -> 512" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
