"""Attention engine: pattern definitions, every backend against the dense oracle, errors."""

from __future__ import annotations

import pytest
import torch

from sinklora.attention import BACKENDS, Pattern, build_mask, sparse_attention
from sinklora.attention.reference import dense_attention

SPARSE = ("s2", "sf", "s2_roll")
ALL = ("full",) + SPARSE

# The pattern table: every row is checked against the dense oracle on every backend that can run it
# (grouped and fused here; flex's mask_mod through eager FlexAttention on CPU and flex and fused on CUDA
# in test_attention_kernels.py). A new pattern is one predicate in sinklora.attention.pattern.KINDS plus
# one row here.
PATTERN_TABLE = [
    ("full", {}),
    ("s2", {}),
    ("s2_roll", {}),
    ("sf", {}),
    ("sf", {"sink_tokens": 1}),
    ("sf", {"shifted_head_fraction": 1.0}),
    ("sf", {"shifted_head_fraction": 0.0}),
    ("s2_roll", {"sink_tokens": 2}),
]
TABLE_IDS = [name + "".join(f"-{k}{v}" for k, v in p.items()) for name, p in PATTERN_TABLE]


def _rows(text: str) -> torch.Tensor:
    return torch.tensor([[c == "x" for c in line.split("|")[1]] for line in text.strip().splitlines()])


def test_mask_definitions_drawn_by_hand():
    # N = 12, G = 4 (shift 2), 1 sink, H = 2: head 0 unshifted, head 1 shifted (LongLoRA: h >= H // 2)
    s2_shifted = _rows("""
        |x...........|
        |xx..........|
        |..x.........|
        |..xx........|
        |..xxx.......|
        |..xxxx......|
        |......x.....|
        |......xx....|
        |......xxx...|
        |......xxxx..|
        |..........x.|
        |..........xx|""")
    s2_plain = _rows("""
        |x...........|
        |xx..........|
        |xxx.........|
        |xxxx........|
        |....x.......|
        |....xx......|
        |....xxx.....|
        |....xxxx....|
        |........x...|
        |........xx..|
        |........xxx.|
        |........xxxx|""")
    roll_shifted = _rows("""
        |x.........xx|
        |xx........xx|
        |..x.........|
        |..xx........|
        |..xxx.......|
        |..xxxx......|
        |......x.....|
        |......xx....|
        |......xxx...|
        |......xxxx..|
        |..........x.|
        |..........xx|""")
    s2 = build_mask("s2", 12, 2, group_size=4)
    assert torch.equal(s2[0], s2_plain) and torch.equal(s2[1], s2_shifted)
    sf = build_mask("sf", 12, 2, group_size=4, sink_tokens=1)
    sink_col = torch.tril(torch.ones(12, 12, dtype=torch.bool))[:, :1]
    assert torch.equal(sf[1], s2_shifted | torch.cat([sink_col, torch.zeros(12, 11, dtype=torch.bool)], 1))
    roll = build_mask("s2_roll", 12, 2, group_size=4)
    assert torch.equal(roll[0], s2_plain) and torch.equal(roll[1], roll_shifted)


@pytest.mark.parametrize("pattern", ALL)
@pytest.mark.parametrize("n,g", [(16, 4), (17, 4), (23, 6), (9, 3)])
def test_mask_properties(pattern, n, g):
    h, sinks = 9, {"sf": {"sink_tokens": 2}}.get(pattern, {})  # sinks must be fewer than a group's tokens
    m = build_mask(pattern, n, h, group_size=g, **sinks)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    assert m.shape == (h, n, n) and m.dtype == torch.bool
    assert m.diagonal(dim1=1, dim2=2).all()  # every token sees itself
    if pattern != "s2_roll":
        assert not (m & ~causal).any()  # causal
    else:
        assert (m & ~causal).any()  # the leak it exists to reproduce
    if pattern in ("s2", "sf"):
        shifted = torch.tensor([(m[i] != m[0]).any().item() for i in range(h)])
        assert shifted.sum() == 5 and not shifted[:4].any()  # heads 4..8 shifted for H = 9
        row_counts = m.sum(-1)
        assert row_counts.max() <= g + sinks.get("sink_tokens", 0)


@pytest.mark.parametrize("pattern", SPARSE)
def test_large_group_is_full_attention(pattern):
    causal = torch.tril(torch.ones(10, 10, dtype=torch.bool)).expand(3, 10, 10)
    assert torch.equal(build_mask(pattern, 10, 3, group_size=10), causal)
    assert torch.equal(build_mask(pattern, 10, 3, group_size=50), causal)
    assert torch.equal(build_mask(pattern, 10, 3, group_ratio=1.0), causal)


def test_sf_sinks_and_shift_parameters():
    m = build_mask("sf", 32, 4, group_size=8, sink_tokens=4)
    assert m[:, 4:, :4].all()  # every later query sees the 4 sinks
    assert torch.equal(m[:, :4, :4], torch.tril(torch.ones(4, 4, dtype=torch.bool)).expand(4, 4, 4))
    none_shifted = build_mask("sf", 32, 4, group_size=8, shifted_head_fraction=0.0)
    assert all(torch.equal(none_shifted[i], none_shifted[0]) for i in range(4))
    all_shifted = build_mask("sf", 32, 4, group_size=8, shifted_head_fraction=1.0)
    assert not torch.equal(all_shifted[0], none_shifted[0])
    tiny = build_mask("sf", 3, 2, group_size=5, sink_tokens=4)  # seq_len < sink_tokens
    assert torch.equal(tiny[0], torch.tril(torch.ones(3, 3, dtype=torch.bool)))


def _qkv(b, hq, hkv, n, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype).to(device).requires_grad_() for h in (hq, hkv, hkv)]


def _out_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    return (out, *grads)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


SHAPES = [  # (B, Hq, Hkv, N, D, group settings)
    (1, 4, 2, 64, 16, dict(group_ratio=0.25)),
    (2, 9, 3, 37, 8, dict(group_size=8)),  # SmolLM2 head layout, N not a multiple of G
    (2, 5, 5, 23, 8, dict(group_size=6)),  # odd head count, no GQA
    (1, 3, 1, 30, 8, dict(group_size=7)),
    (2, 4, 2, 3, 8, dict(group_size=5)),  # seq_len < sink_tokens (one causal group)
    (1, 4, 4, 20, 8, dict(group_size=20)),  # group covers the sequence
]


CPU_BACKENDS = ("grouped", "fused")


def runs_on(backend: str, pattern: Pattern, device: str = "cpu") -> bool:
    return BACKENDS[backend].supports(pattern.resolve(64, 4), torch.device(device))


def backend_rows(backends, device: str = "cpu") -> list:
    """(backend, table row) for every backend that can run the row's pattern on ``device``."""
    return [pytest.param(b, row, id=f"{b}-{rid}") for b in backends for row, rid in zip(PATTERN_TABLE, TABLE_IDS)
            if runs_on(b, Pattern(row[0], group_size=8, **row[1]), device)]


@pytest.mark.parametrize("backend,row", backend_rows(CPU_BACKENDS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}H{s[1]}kv{s[2]}N{s[3]}")
def test_backend_matches_dense_reference(backend, row, shape):
    (name, params), (B, Hq, Hkv, N, D, groups) = row, shape
    pattern = Pattern(name, **params, **groups)
    q, k, v = _qkv(B, Hq, Hkv, N, D)
    mask = build_mask(pattern, N, Hq)
    ref = _out_and_grads(lambda *a: dense_attention(*a, mask), q, k, v)
    got = _out_and_grads(lambda *a: sparse_attention(*a, pattern, backend=backend), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert _rel_err(a, b) < 1e-5, (name, _rel_err(a, b))


def test_sinks_must_be_fewer_than_a_group_in_the_library_too():
    with pytest.raises(ValueError, match="sink_tokens=12 >= group_size=9"):
        Pattern("sf", group_size=9, sink_tokens=12)
    q, k, v = _qkv(1, 4, 2, 40, 8)
    with pytest.raises(ValueError, match=r"sink_tokens=4 >= group size 2 at 10 tokens"):
        sparse_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], "sf", group_ratio=0.25)
    assert Pattern("sf").problems_at(10) and not Pattern("sf").problems_at(40)  # what the CLI reports


def test_pattern_keys_are_short_and_stable():
    assert Pattern("sf").key == "sf" and Pattern("full").key == "full"
    assert Pattern("sf", group_size=512, sink_tokens=8).key == "sf-g512-s8"
    assert Pattern("s2", group_ratio=0.125, shifted_head_fraction=0.0).key == "s2-r0.125-f0"
    assert Pattern("sf", sink_tokens=4) == Pattern("sf") and hash(Pattern("sf", sink_tokens=4)) == hash(Pattern("sf"))


@pytest.mark.parametrize("row", PATTERN_TABLE, ids=TABLE_IDS)
def test_a_slice_of_heads_resolves_like_the_whole_model(row):
    """Sequence parallelism holds heads [offset, offset + h) of H: their masks are those heads' masks."""
    name, params = row
    pattern = Pattern(name, group_size=5, **params)
    whole = build_mask(pattern, 23, 9)
    from sinklora.attention.reference import spec_mask

    for offset, h in ((0, 3), (3, 3), (6, 3), (4, 5)):
        part = spec_mask(pattern.resolve(23, h, head_offset=offset, total_heads=9))
        assert torch.equal(part, whole[offset:offset + h]), (offset, h)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pattern", ALL)
def test_padding_and_packing_match_reference(backend, pattern):
    if not runs_on(backend, Pattern(pattern, group_size=5)):
        pytest.skip(f"{backend} does not run {pattern}")
    B, Hq, Hkv, N, D = 2, 9, 3, 30, 8
    q, k, v = _qkv(B, Hq, Hkv, N, D, seed=1)
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0, 21:] = False  # right padding
    kpm[1, :4] = False  # left padding (its empty rows must come out as zeros, never NaN)
    docs = (7, 2, 12, 9)
    for extra in (dict(key_padding_mask=kpm), dict(doc_lengths=docs), dict(key_padding_mask=kpm, doc_lengths=docs)):
        ref = _out_and_grads(lambda *a: sparse_attention(*a, pattern, backend="reference", group_size=5, **extra), q, k, v)
        got = _out_and_grads(lambda *a: sparse_attention(*a, pattern, backend=backend, group_size=5, **extra), q, k, v)
        for a, b in zip(got, ref):
            assert torch.isfinite(a).all()
            assert _rel_err(a, b) < 1e-5, list(extra)


def test_packed_documents_equal_separate_sequences():
    q, k, v = _qkv(1, 4, 2, 30, 8, seed=2)
    packed = sparse_attention(q, k, v, "sf", group_size=6, sink_tokens=2, doc_lengths=(12, 18))
    first = sparse_attention(q[:, :, :12], k[:, :, :12], v[:, :, :12], "sf", group_size=6, sink_tokens=2)
    second = sparse_attention(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], "sf", group_size=6, sink_tokens=2)
    torch.testing.assert_close(packed, torch.cat([first, second], dim=2))


def test_reference_matches_pytorch_sdpa():
    q, k, v = _qkv(2, 4, 2, 19, 8, seed=3)
    mask = build_mask("sf", 19, 4, group_size=5)
    ours = dense_attention(q, k, v, mask)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask
    )
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_memory_is_linear_in_sequence(backend):
    """No tensor saved for backward may be N x N per head: the largest grows like N x (G + S)."""
    B, Hq, Hkv, N, D, G = 1, 4, 2, 512, 8, 32
    q, k, v = _qkv(B, Hq, Hkv, N, D)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse_attention(q, k, v, "sf", backend=backend, group_size=G)
    assert max(sizes) <= B * Hq * (N + G) * (G + 4)  # a dense mask would be B * Hq * N * N = 16x larger
    assert max(sizes) < B * Hq * N * N / 8


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(pattern="sink"), "pattern='sink'"),
        (dict(pattern="sf", group_size=0), "group_size=0"),
        (dict(pattern="sf", group_ratio=1.5), "group_ratio=1.5"),
        (dict(pattern="sf", sink_tokens=-1), "sink_tokens=-1"),
        (dict(pattern="s2", sink_tokens=4), "sink_tokens=4"),
        (dict(pattern="sf", shifted_head_fraction=2), "shifted_head_fraction=2"),
        (dict(pattern="sf", group_size=4, group_ratio=0.5), "group_size=4"),
    ],
)
def test_bad_parameters_name_the_parameter(kwargs, needle):
    q, k, v = _qkv(1, 4, 2, 16, 8)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        sparse_attention(q, k, v, **kwargs)


def test_bad_shapes():
    q, k, v = _qkv(1, 4, 3, 16, 8)
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        sparse_attention(q, k, v, "sf")
    q, k, v = _qkv(1, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="4-D"):
        sparse_attention(q[0], k[0], v[0], "sf")
    with pytest.raises(ValueError, match="backend='flex' cannot run pattern 'sf' on cpu"):
        sparse_attention(q, k, v, "sf", backend="flex", group_size=8)
    with pytest.raises(ValueError, match="backend='fused' cannot run pattern 's2_roll'"):
        sparse_attention(q, k, v, "s2_roll", backend="fused", group_size=8)
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        sparse_attention(q, k, v, "sf", group_size=8, key_padding_mask=torch.ones(1, 15, dtype=torch.bool))


def test_resolve_defaults():
    spec = Pattern("sf").resolve(8192, 9)
    assert (spec.group_size, spec.sink_tokens, spec.first_shifted_head, spec.shift) == (2048, 4, 4, 1024)
    assert Pattern("s2").resolve(100, 32).first_shifted_head == 16
