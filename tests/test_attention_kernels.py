"""Kernel paths: FlexAttention's mask_mods and block masks, the fused backend's runs, the CUDA rule,
and the GPU checks (marked ``gpu``) of flex and fused against the oracle."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_attention import PATTERN_TABLE, TABLE_IDS, _out_and_grads, _qkv, _rel_err, backend_rows

from sinklora.attention import Pattern, backends, flex, fused, sparse_attention
from sinklora.attention.reference import dense_attention, reference_mask
from sinklora.counters import OpCounter

# ---- FlexAttention's mask_mods on CPU ------------------------------------------------------------


def _batch_mods(spec, B):
    kpm = torch.ones(B, spec.seq_len, dtype=torch.bool)
    kpm[0, spec.seq_len * 5 // 6:] = False
    kpm[-1, :3] = False
    docs = (spec.seq_len // 3, spec.seq_len // 4, spec.seq_len - spec.seq_len // 3 - spec.seq_len // 4)
    return [({}, flex.mask_mod(spec), None), ({"key_padding_mask": kpm}, flex.mask_mod(spec, kpm), kpm),
            ({"doc_lengths": docs}, flex.mask_mod(spec, doc_lengths=docs), None),
            ({"key_padding_mask": kpm, "doc_lengths": docs}, flex.mask_mod(spec, kpm, docs), kpm)]


@pytest.mark.parametrize("row", PATTERN_TABLE, ids=TABLE_IDS)
@pytest.mark.parametrize("n", [300, 1000])
def test_flex_mask_mods_accept_every_index_the_kernels_pass(row, n):
    """Flex evaluates a mask_mod on whole blocks: indices up to the next multiple of the block size
    (pytorch/pytorch#137801). Evaluated eagerly over that whole range, a mask_mod that indexes past a
    captured tensor raises here (CUDA reads out of bounds silently); inside the sequence it must equal
    the oracle, and the padding past it must never be a key of a real query."""
    spec = Pattern(row[0], group_size=64, **row[1]).resolve(n, 9)
    np_ = flex.padded_length(n)
    assert np_ % flex.BLOCK_SIZE == 0 and np_ > n
    B = 2
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(9)[None, :, None, None]
    pos = torch.arange(np_)
    for extra, mod, kpm in _batch_mods(spec, B):
        got = mod(b, h, pos[None, None, :, None], pos[None, None, None, :]).expand(B, 9, np_, np_)
        ref = reference_mask(spec, **extra)
        ref = ref.expand(B, -1, -1, -1) if ref.dim() == 4 else ref[None].expand(B, -1, -1, -1)
        assert torch.equal(got[:, :, :n, :n], ref), list(extra)
        if extra:
            assert not got[:, :, :n, n:].any(), list(extra)  # no padding key is ever read by a real query


@pytest.mark.parametrize("row", PATTERN_TABLE, ids=TABLE_IDS)
def test_flex_mask_mod_logic_on_cpu(row):
    """The GPU path's mask_mod (padding and packing included), run through eager FlexAttention on CPU
    (forward only: Flex has no CPU backward), equals the oracle."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Hq, Hkv, N, D = 2, 9, 3, 300, 16
    q, k, v = (t.detach() for t in _qkv(B, Hq, Hkv, N, D, seed=5))
    pattern = Pattern(row[0], group_size=64, **row[1])
    spec = pattern.resolve(N, Hq)
    for extra, mod, kpm in _batch_mods(spec, B)[:3]:  # padding with packing: its mask is checked above
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            block_mask = create_block_mask(mod, None if kpm is None else B, Hq, N, N, device="cpu",
                                           BLOCK_SIZE=flex.BLOCK_SIZE)
            got = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
        ref = sparse_attention(q, k, v, pattern, backend="reference", **extra)
        assert _rel_err(got, ref) < 1e-5, list(extra)


def test_flex_block_masks_are_built_once_per_shape_and_per_batch(monkeypatch):
    """Plain batches: one block mask per (pattern, length) for the run; padded or packed batches: one
    per batch, shared through the batch cache by every layer."""
    from torch.nn.attention.flex_attention import create_block_mask

    built = []

    def counting_create(*args, **kwargs):
        built.append(args[1:5])
        return create_block_mask(*args, **kwargs)

    monkeypatch.setattr(flex, "_compiled", lambda: (None, counting_create))
    flex._plain_block_mask.cache_clear()
    spec = Pattern("sf", group_size=64).resolve(200, 4)
    first = flex.block_mask(spec, None, None, torch.device("cpu"))
    assert flex.block_mask(spec, None, None, torch.device("cpu"), {}) is first and len(built) == 1
    kpm = torch.ones(2, 200, dtype=torch.bool)
    cache: dict = {}
    for _layer in range(3):
        padded = flex.block_mask(spec, kpm, None, torch.device("cpu"), cache)
        packed = flex.block_mask(spec, None, (80, 120), torch.device("cpu"), cache)
    assert len(built) == 3 and built[1] == (2, 4, 200, 200) and built[2] == (None, 4, 200, 200)
    assert padded is not packed
    flex._plain_block_mask.cache_clear()


# ---- the fused backend ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,g,s", [(64, 16, 4), (70, 16, 4), (37, 8, 3), (30, 8, 6), (9, 20, 0)])
def test_fused_runs_cover_the_sequence(n, g, s):
    """Runs are consecutive, cover [0, N) exactly, and are few (at most four per head class)."""
    spec = Pattern("sf", group_size=g, sink_tokens=min(s, g - 1)).resolve(n, 4)
    for shifted in (False, True):
        runs = fused.runs(spec, shifted)
        assert len(runs) <= 4
        pos = 0
        for start, m, L, P in runs:
            assert start == pos and P == min(spec.sink_tokens, start) and 1 <= L <= spec.group_size
            pos += m * L
        assert pos == n


def test_fused_uses_only_fused_sdpa_kernels():
    """Without padding, fused runs no materialised softmax: every score goes through PyTorch's fused
    SDPA kernel (on CPU its flash kernel; on CUDA the same calls reach flash / cuDNN)."""
    q, k, v = _qkv(1, 9, 3, 256, 16)
    with OpCounter() as c:
        out = sparse_attention(q, k, v, "sf", backend="fused", group_size=64)
        out.sum().backward()
    names = set(c.op_names)
    assert any("scaled_dot_product" in n for n in names), names
    assert not names & {"softmax", "_softmax", "masked_fill", "bmm", "baddbmm"}, names & {"softmax", "_softmax"}
    assert c.host_reads == 0, c.reads


def test_grouped_device_tables_are_shared_by_the_batch():
    q, k, v = _qkv(1, 4, 2, 40, 8)
    cache: dict = {}
    a = sparse_attention(q, k, v, "sf", backend="grouped", group_size=8, batch_cache=cache)
    (key, tables), = cache.items()
    b = sparse_attention(q, k, v, "sf", backend="grouped", group_size=8, batch_cache=cache)
    assert list(cache) == [key] and cache[key] is tables
    torch.testing.assert_close(a, b)


# ---- the backend rule ------------------------------------------------------------------------------


def test_backend_rule(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: no GPU needed to ask
    sf, roll = Pattern("sf").resolve(8192, 9), Pattern("s2_roll").resolve(8192, 9)
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    assert backends.choose_backend(sf, cpu, head_dim=64) == "fused"
    assert backends.choose_backend(sf, cpu, padded_or_packed=True, head_dim=64) == "fused"
    assert backends.choose_backend(roll, cpu, head_dim=64) == "grouped"  # fused cannot run s2_roll
    monkeypatch.setattr(backends, "FUSED_ON_CUDA", {})
    assert backends.choose_backend(sf, cuda, head_dim=64) == "flex"  # not measured: Flex stays
    assert backends.choose_backend(sf, cuda, padded_or_packed=True, head_dim=64) == "grouped"
    monkeypatch.setattr(backends, "FUSED_ON_CUDA", {64: 4096})
    assert backends.choose_backend(sf, cuda, head_dim=64) == "fused"
    assert backends.choose_backend(sf, cuda, head_dim=128) == "flex"
    assert backends.choose_backend(Pattern("sf").resolve(2048, 9), cuda, head_dim=64) == "flex"
    assert backends.choose_backend(roll, cuda, head_dim=64) == "flex"  # fused cannot run s2_roll
    monkeypatch.setenv(backends.BACKEND_ENV, "fused")
    assert backends.choose_backend(sf, cuda, padded_or_packed=True, head_dim=64) == "fused"


# ---- GPU: flex and fused against the oracle ------------------------------------------------------


# In the order the GPU suite needs them within its time limit: fused (nothing to compile) first, then
# Flex with padding and packing (its fix), then Flex on every pattern (each row compiles its kernels).
def _check_fp32(backend, row, shape=(2, 9, 3, 1000, 64)):
    B, Hq, Hkv, N, D = shape
    q, k, v = _qkv(B, Hq, Hkv, N, D, device="cuda")
    pattern = Pattern(row[0], group_ratio=0.25, **row[1])
    mask = reference_mask(pattern.resolve(N, Hq), device="cuda")
    ref = _out_and_grads(lambda *a: dense_attention(*a, mask), q, k, v)
    got = _out_and_grads(lambda *a: sparse_attention(*a, pattern, backend=backend), q, k, v)
    for a, b in zip(got, ref):
        assert _rel_err(a, b) < 1e-4  # TF32-free fp32 kernels; they accumulate in a different order


@pytest.mark.gpu
@pytest.mark.parametrize("backend,row", backend_rows(("fused",), "cuda"))
def test_fused_matches_reference_fp32_on_cuda(backend, row):
    _check_fp32(backend, row)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fused-s2", "fused-sf", "flex-s2", "flex-sf"])
def test_cuda_bf16_within_twice_pytorch_error(case):
    backend, pattern = case.split("-")
    B, Hq, Hkv, N, D = 1, 8, 2, 1024, 64
    q, k, v = _qkv(B, Hq, Hkv, N, D, device="cuda")
    mask = reference_mask(Pattern(pattern, group_ratio=0.25).resolve(N, Hq), device="cuda")
    ref = _out_and_grads(lambda *a: dense_attention(*a, mask), q, k, v)
    lo = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    torch_bf16 = _out_and_grads(
        lambda q_, k_, v_: torch.nn.functional.scaled_dot_product_attention(
            q_, k_.repeat_interleave(Hq // Hkv, 1), v_.repeat_interleave(Hq // Hkv, 1), attn_mask=mask),
        *lo)
    ours = _out_and_grads(lambda *a: sparse_attention(*a, pattern, backend=backend, group_ratio=0.25), *lo)
    for a, t, r in zip(ours, torch_bf16, ref):
        assert (a.float() - r).abs().max() <= 2 * (t.float() - r).abs().max() + 1e-5


def _padded_and_packed(n):
    kpm = torch.ones(2, n, dtype=torch.bool, device="cuda")
    kpm[0, n * 5 // 7:] = False
    return (dict(key_padding_mask=kpm), dict(doc_lengths=(n // 7, n * 5 // 14, n - n // 7 - n * 5 // 14)))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "fused"])
def test_cuda_padding_and_packing(backend):
    """The default CUDA dispatch (grouped for such batches) and the fused backend."""
    q, k, v = _qkv(2, 9, 3, 700, 64, device="cuda", seed=4)
    for extra in _padded_and_packed(700):
        ref = _out_and_grads(lambda *a: sparse_attention(*a, "sf", backend="reference", group_size=64, **extra), q, k, v)
        got = _out_and_grads(lambda *a: sparse_attention(*a, "sf", backend=backend, group_size=64, **extra), q, k, v)
        for a, b in zip(got, ref):
            assert _rel_err(a, b) < 1e-4, list(extra)


@pytest.mark.gpu
@pytest.mark.xfail(reason="Flex with a key padding mask or packed documents gave rel. error 0.18 on an H100 "
                   "(torch 2.11); the captured tensors are now padded to the block size, not yet run on a GPU. "
                   "XPASS here means the fix works and the grouped fallback for such batches can go")
def test_flex_padding_and_packing():
    n = 1000  # not a multiple of the block size: the case that failed
    q, k, v = _qkv(2, 9, 3, n, 64, device="cuda", seed=4)
    for extra in _padded_and_packed(n):
        ref = _out_and_grads(lambda *a: sparse_attention(*a, "sf", backend="reference", group_size=64, **extra), q, k, v)
        got = _out_and_grads(lambda *a: sparse_attention(*a, "sf", backend="flex", group_size=64, **extra), q, k, v)
        for a, b in zip(got, ref):
            assert _rel_err(a, b) < 1e-4, list(extra)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,row", backend_rows(("flex",), "cuda"))
def test_flex_matches_reference_fp32(backend, row):
    _check_fp32(backend, row)


@pytest.mark.slow
def test_compiled_flex_padding_and_packing_on_cpu():
    """The GPU test above through the *compiled* path (inductor's CPU code), forward only (a few minutes)."""
    q, k, v = (t.detach() for t in _qkv(2, 9, 3, 700, 64, seed=4))
    kpm = torch.ones(2, 700, dtype=torch.bool)
    kpm[0, 500:] = False
    spec = Pattern("sf", group_size=64).resolve(700, 9)
    for extra in ({}, dict(key_padding_mask=kpm), dict(doc_lengths=(100, 250, 350))):
        ref = sparse_attention(q, k, v, "sf", backend="reference", group_size=64, **extra)
        assert _rel_err(flex.flex_sparse_attention(q, k, v, spec, 64 ** -0.5, **extra), ref) < 1e-5, list(extra)


# ---- the GPU suite -------------------------------------------------------------------------------


def test_gpu_suite_stages_fit_one_visit():
    """Every listed stage has its function, and the stage limits sum to at most 8 minutes (the script
    refuses to start otherwise). ``bash bench/gpu_suite.sh --dry-run`` runs the stages themselves."""
    import pathlib
    import subprocess

    script = pathlib.Path(__file__).parents[1] / "bench" / "gpu_suite.sh"
    listed = subprocess.run(["bash", str(script), "--list"], capture_output=True, text=True, check=True).stdout
    stages = [line.split() for line in listed.splitlines() if line.strip()]
    visit = [int(limit.rstrip("s")) for _, limit, group in stages if group != "extra"]
    assert len(visit) >= 5 and sum(visit) <= 480
    text = script.read_text()
    for name, _, group in stages:
        assert f"stage_{name}() {{" in text and group in ("nomodel", "model", "extra"), name
