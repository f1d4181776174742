"""Hypothesis properties of masking, the KV cache, grouped-query attention and RoPE, on small random shapes.

Profiles: `ci` (derandomized, bounded, what `nox -s tests` uses through HYPOTHESIS_PROFILE=ci) and `dev`
(random, a few more examples) otherwise.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smollm_ref.config import ModelConfig
from smollm_ref.model import LlamaForCausalLM, LlamaRotaryEmbedding, apply_rotary_pos_emb

# Hypothesis ships its own "ci" profile (100 examples); this one replaces it with a bounded one. Registering
# is idempotent, so importing this module twice changes nothing.
_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, max_examples=20, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=40, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# float32 assert_close defaults; used where two different but exact computations are compared.
F32 = dict(rtol=1.3e-6, atol=1e-5)


@st.composite
def configs(draw, kv_equal_heads: bool = False) -> ModelConfig:
    heads = draw(st.integers(1, 4))
    kv = heads if kv_equal_heads else draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    return ModelConfig(
        vocab_size=draw(st.integers(8, 64)),
        hidden_size=draw(st.sampled_from([8, 16, 32])),
        intermediate_size=draw(st.sampled_from([16, 32])),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=256,
        rope_theta=draw(st.sampled_from([100.0, 10000.0, 100000.0, 500000.0])),
        initializer_range=0.2,  # larger than transformers' 0.02: attention that is far from uniform
        bos_token_id=None,
        eos_token_id=None,
    )


def build(config: ModelConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def token_ids(draw, config: ModelConfig, batch: int, length: int) -> torch.Tensor:
    values = draw(st.lists(st.integers(0, config.vocab_size - 1), min_size=batch * length, max_size=batch * length))
    return torch.tensor(values).view(batch, length)


seeds = st.integers(0, 2**16)


# masking


@given(configs(), seeds, st.data())
def test_changing_later_tokens_never_changes_earlier_outputs(config, seed, data):
    model = build(config, seed)
    length = data.draw(st.integers(2, 24))
    ids = token_ids(data.draw, config, data.draw(st.integers(1, 3)), length)
    t = data.draw(st.integers(0, length - 2))
    changed = ids.clone()
    changed[:, t + 1 :] = token_ids(data.draw, config, ids.shape[0], length - t - 1)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])


@given(configs(), seeds, st.data())
def test_left_padded_row_equals_the_unpadded_sequence(config, seed, data):
    model = build(config, seed)
    length, pad = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 8))
    ids = token_ids(data.draw, config, 1, length)
    padded = torch.cat([token_ids(data.draw, config, 1, pad), ids], dim=1)  # padding ids are arbitrary
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, length, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        in_batch = model(padded, attention_mask=mask).logits[:, pad:]
    torch.testing.assert_close(in_batch, alone, **F32)


@given(configs(), seeds, st.data())
def test_rows_that_are_all_padding_stay_finite(config, seed, data):
    model = build(config, seed)
    length = data.draw(st.integers(1, 12))
    ids = token_ids(data.draw, config, 2, length)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert out.logits.isfinite().all()
    if length > 1:  # with one token there is no next-token target at all, and the mean of nothing is NaN (as in transformers)
        assert out.loss.isfinite()


@given(configs(), seeds, st.data())
def test_kv_cached_decode_equals_full_forward_for_any_split(config, seed, data):
    model = build(config, seed)
    length = data.draw(st.integers(2, 20))
    ids = token_ids(data.draw, config, data.draw(st.integers(1, 2)), length)
    cuts = sorted(data.draw(st.sets(st.integers(1, length - 1), min_size=1, max_size=4)))
    cache = model.new_kv_cache()
    pieces = []
    with torch.no_grad():
        full = model(ids).logits
        for start, stop in zip([0, *cuts], [*cuts, length]):  # prefill, then chunks of any size (1 = decode)
            pieces.append(model(ids[:, start:stop], kv_cache=cache).logits)
    assert len(cache) == length
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **F32)


# grouped-query attention


def plain_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """(B, H, T, D) rotated independently of the model: dimension i pairs with i + D/2 (the rotate_half
    layout) and turns by angle position * theta^(-2i/D), in float64."""
    d = x.shape[-1]
    angles = torch.arange(x.shape[2], dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angles.cos(), angles.sin()  # (T, D/2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def plain_multi_head_attention(attn, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Textbook causal multi-head attention with `attn`'s weights, in float64, one head at a time."""
    w = {n: getattr(attn, n).weight.double() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    b, t, _ = x.shape
    x = x.double()
    split = lambda y: y.view(b, t, -1, attn.head_dim).transpose(1, 2)  # noqa: E731  (B, H, T, D)
    q, k, v = plain_rope(split(x @ w["q_proj"].T), theta), plain_rope(split(x @ w["k_proj"].T), theta), split(x @ w["v_proj"].T)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    heads = []
    for h in range(q.shape[1]):
        scores = (q[:, h] @ k[:, h].transpose(-1, -2)) / math.sqrt(attn.head_dim)  # (B, T, T)
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, h])
    return torch.cat(heads, dim=-1) @ w["o_proj"].T


@given(configs(kv_equal_heads=True), seeds, st.data())
def test_gqa_with_as_many_kv_heads_as_query_heads_is_plain_multi_head_attention(config, seed, data):
    model = build(config, seed)
    attn = model.model.layers[0].self_attn
    x = torch.randn(
        data.draw(st.integers(1, 2)),
        data.draw(st.integers(1, 16)),
        config.hidden_size,
        generator=torch.Generator().manual_seed(seed),
    )
    with torch.no_grad():
        out = attn(x, model.model.rotary_emb(x, torch.arange(x.shape[1])[None]))
    # float32 against float64: a few ulps of float32 per accumulated term
    torch.testing.assert_close(out.double(), plain_multi_head_attention(attn, x, config.rope_theta), rtol=1e-4, atol=1e-5)


@given(configs(), seeds, st.data())
def test_gqa_equals_multi_head_attention_with_each_kv_head_repeated_for_its_group(config, seed, data):
    """Query head h reads KV head h // (H / K): an MHA model whose k/v projections repeat each KV head's
    rows for its group computes the same function."""
    gqa = build(config, seed)
    mha = LlamaForCausalLM(config.replace(num_key_value_heads=config.num_attention_heads)).eval()
    groups, d = config.num_key_value_groups, config.head_dim
    state = {}
    for name, w in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = w.view(-1, d, w.shape[-1]).repeat_interleave(groups, dim=0).reshape(-1, w.shape[-1])
        state[name] = w
    mha.load_state_dict(state)
    ids = token_ids(data.draw, config, 1, data.draw(st.integers(1, 16)))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, **F32)


# RoPE


@st.composite
def rope_cases(draw):
    """(rotary module, q (B, H, T, D), k, positions (B, T), theta) with random positions up to a few thousand."""
    head_dim = draw(st.sampled_from([2, 4, 8, 16, 64]))
    theta = draw(st.floats(10.0, 1e6, allow_nan=False, allow_infinity=False))
    config = ModelConfig(vocab_size=8, hidden_size=head_dim, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=head_dim, rope_theta=theta)  # fmt: skip
    b, h, t = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    positions = torch.tensor(draw(st.lists(st.integers(0, 4096), min_size=b * t, max_size=b * t))).view(b, t)
    gen = torch.Generator().manual_seed(draw(seeds))
    q, k = torch.randn(b, h, t, head_dim, generator=gen), torch.randn(b, h, t, head_dim, generator=gen)
    return LlamaRotaryEmbedding(config), q, k, positions, theta


def rotate(rope, q, k, positions):
    cos, sin = rope(q, positions)
    return apply_rotary_pos_emb(q, k, cos, sin)


@given(rope_cases())
def test_rope_preserves_norms(case):
    rope, q, k, positions, theta = case
    rq, rk = rotate(rope, q, k, positions)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rk.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=1e-6)


@given(rope_cases(), st.integers(0, 2048))
def test_rope_inner_product_depends_only_on_the_offset(case, shift):
    rope, q, k, positions, theta = case
    m, n = positions[:, :1].expand_as(positions), positions  # query at m, keys at every n
    rq, rk = rotate(rope, q, k, m), rotate(rope, q, k, n)[1]
    sq, sk = rotate(rope, q, k, m + shift), rotate(rope, q, k, n + shift)[1]
    dots, shifted = (rq[0] * rk).sum(-1), (sq[0] * sk).sum(-1)
    # float32 angles err by up to ~position * 2^-24 rad; the inner product by that times |q||k| (plus a few ulps).
    largest = int((positions + shift).max()) + 1
    tol = (4 * largest * 2**-24 + 1e-6) * (q.norm(dim=-1) * k.norm(dim=-1))
    assert ((dots - shifted).abs() <= tol + 1e-6).all()


@given(rope_cases())
def test_rope_at_position_zero_is_the_identity(case):
    rope, q, k, positions, theta = case
    rq, rk = rotate(rope, q, k, torch.zeros_like(positions))
    assert torch.equal(rq, q) and torch.equal(rk, k)


@given(rope_cases())
def test_rope_equals_transformers(case):
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as hf

    rope, q, k, positions, theta = case
    d = q.shape[-1]
    theirs = hf.LlamaRotaryEmbedding(LlamaConfig(hidden_size=d, num_attention_heads=1, head_dim=d, rope_theta=theta))
    cos, sin = rope(q, positions)
    their_cos, their_sin = theirs(q, positions)
    assert torch.equal(rope.inv_freq, theirs.inv_freq)
    assert torch.equal(cos, their_cos) and torch.equal(sin, their_sin)
    for ours_t, theirs_t in zip(apply_rotary_pos_emb(q, k, cos, sin), hf.apply_rotary_pos_emb(q, k, their_cos, their_sin)):
        assert torch.equal(ours_t, theirs_t)


@given(rope_cases())
def test_rope_cos_sin_stay_float32_under_bf16_autocast(case):
    rope, q, _, positions, _ = case
    expected = rope(q, positions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope(q, positions)
        low_cos, low_sin = rope(q.bfloat16(), positions)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])
    # bf16 activations get the float32 values rounded once, not angles computed in bf16
    assert torch.equal(low_cos, expected[0].bfloat16()) and torch.equal(low_sin, expected[1].bfloat16())


def test_profiles_are_registered():
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.deadline is None and ci.max_examples <= 50
    if os.environ.get("HYPOTHESIS_PROFILE") == "ci":
        assert settings.default.derandomize


@pytest.mark.parametrize("theta", [10000.0, 100000.0])
def test_plain_rope_reference_agrees_with_rotate_half_layout(theta):
    """The independent RoPE used above is itself checked: dimension pairs (i, i + D/2) turned by the angle."""
    x = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    x[..., 0] = 1.0  # unit vector in the first dimension of pair 0
    out = plain_rope(x, theta)
    angles = torch.arange(3, dtype=torch.float64)  # pair 0 has frequency theta^0 = 1
    torch.testing.assert_close(out[0, 0, :, 0], angles.cos())
    torch.testing.assert_close(out[0, 0, :, 2], angles.sin())
