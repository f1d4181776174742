"""The model against transformers' LlamaForCausalLM (random weights, tiny configs), and its own invariants.

Against transformers the comparisons are exact: the same ops in the same order give the same bits (CPU,
float32, measured so on torch 2.13). Within the model, where a computation takes another path (a KV cache,
an explicit softmax), the tolerance is the float32 rounding measured for it."""

import ast
import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers

import smollm_ref.model as model_module
from smollm_ref.convert import to_transformers
from smollm_ref.model import LlamaForCausalLM, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb, repeat_kv
from tests.conftest import tiny_config


def twins(**changes):
    """Our tiny model and transformers' twin, built through the production converter."""
    ours = LlamaForCausalLM(tiny_config(**changes)).eval()
    return ours, to_transformers(ours).eval()


def layer_outputs(model, ids, **kw):
    """Each decoder layer's output, captured with forward hooks (works for both implementations)."""
    outs = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for layer in model.model.layers
    ]
    try:
        logits = model(ids, **kw).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, outs


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_logits_and_every_layer_match_transformers(tied, kv_heads):
    ours, theirs = twins(tie_word_embeddings=tied, num_key_value_heads=kv_heads)
    ids = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        a, a_layers = layer_outputs(ours, ids)
        b, b_layers = layer_outputs(theirs, ids)
    assert len(a_layers) == len(b_layers) == 2
    for x, y in zip(a_layers, b_layers):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_left_padded_batch_matches_transformers_on_real_tokens():
    ours, theirs = twins()
    ids = torch.randint(3, 256, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :1] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits  # positions derived from the mask
        b = theirs(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=0)


def test_loss_and_gradients_match_transformers():
    ours, theirs = twins()
    ours.train(), theirs.train()
    ids = torch.randint(0, 256, (2, 17))
    labels = ids.clone()
    labels[0, :3] = -100
    la, lb = ours(ids, labels=labels).loss, theirs(ids, labels=labels).loss
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    la.backward(), lb.backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0, msg=name)


def test_causal_mask_applies_without_attention_mask():
    model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 256, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)  # masked keys add exact zeros
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("split", [1, 5, 15])
def test_kv_cached_decode_equals_full_forward(split):
    model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 256, (2, 16))
    cache = model.new_kv_cache()
    with torch.no_grad():
        full = model(ids).logits
        parts = [model(ids[:, :split], kv_cache=cache).logits]
        for t in range(split, 16, 3):  # chunks of several tokens exercise the bottom-right mask
            parts.append(model(ids[:, t : t + 3], kv_cache=cache).logits)
    assert len(cache) == 16
    # A cached chunk attends through an explicit mask, not `is_causal`: another float32 summation order.
    # Measured at most 9.5e-7 (logits up to 2.2, 30 random models).
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=3e-6)


def test_tied_weights_stay_one_tensor():
    model = LlamaForCausalLM(tiny_config())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 256, (2, 8)), labels=torch.randint(0, 256, (2, 8))).loss.backward()
    before = model.lm_head.weight.detach().clone()
    opt.step()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(before, model.lm_head.weight)
    model.to(torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.load_state_dict(LlamaForCausalLM(tiny_config()).to(torch.bfloat16).state_dict())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == tiny_config().num_parameters()


def test_untied_weights_are_separate():
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=False))
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_rms_norm_computes_in_float32_and_casts_before_the_weight():
    norm = LlamaRMSNorm(8, eps=1e-5).to(torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 8, dtype=torch.bfloat16) * 100
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


def test_rope_inv_freq_stays_float32_and_uses_theta():
    config = tiny_config(rope_theta=12345.0)
    rope = LlamaRotaryEmbedding(config)
    # float32 pow against a double rounded once: measured equal, 2 ulps allowed
    torch.testing.assert_close(rope.inv_freq[1], torch.tensor(12345.0 ** (-2 / config.head_dim)), rtol=2.4e-7, atol=0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, rope.inv_freq, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = rope(torch.zeros(1, 4, 64), torch.arange(4)[None])
    assert cos.dtype == sin.dtype == torch.float32


def test_rope_matches_transformers_rotation():
    config = tiny_config()
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    pos = torch.randint(0, 500, (2, 9))
    cos, sin = LlamaRotaryEmbedding(config)(q, pos)
    from transformers.models.llama import modeling_llama as hf

    hf_rope = hf.LlamaRotaryEmbedding(to_transformers(LlamaForCausalLM(config)).config)
    hcos, hsin = hf_rope(q, pos)
    assert torch.equal(cos, hcos) and torch.equal(sin, hsin)
    for x, y in zip(apply_rotary_pos_emb(q, k, cos, sin), hf.apply_rotary_pos_emb(q, k, hcos, hsin)):
        assert torch.equal(x, y)


def test_gqa_head_grouping():
    # KV head j serves query heads j*g ... (j+1)*g - 1.
    kv = torch.arange(3.0).view(1, 3, 1, 1).expand(1, 3, 2, 4)
    rep = repeat_kv(kv, 4)
    assert rep[0, :, 0, 0].tolist() == [0.0] * 4 + [1.0] * 4 + [2.0] * 4


def test_attention_uses_sdpa_with_explicit_mask_for_chunks():
    # T > 1 new tokens after a cache must see every cached key and only earlier new keys.
    from smollm_ref.model import build_attention_mask

    mask = build_attention_mask(None, 3, 5, "cpu")
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert build_attention_mask(None, 5, 5, "cpu") is None and build_attention_mask(torch.ones(2, 5), 1, 5, "cpu") is None


def test_initialisation_follows_transformers():
    config = tiny_config(initializer_range=0.1, pad_token_id=5, vocab_size=4096, hidden_size=128, num_attention_heads=4)
    model = LlamaForCausalLM(config)
    w = model.model.layers[0].mlp.gate_proj.weight
    assert abs(w.std().item() - 0.1) < 0.01 and abs(w.mean().item()) < 0.01
    assert torch.count_nonzero(model.model.embed_tokens.weight[5]) == 0
    assert torch.equal(model.model.norm.weight, torch.ones(128))


def test_resize_token_embeddings_keeps_rows_and_tie():
    model = LlamaForCausalLM(tiny_config())
    before = model.model.embed_tokens.weight.detach().clone()
    model.resize_token_embeddings(300)
    assert model.config.vocab_size == 300 and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight[:256], before)
    assert model(torch.tensor([[299, 3]])).logits.shape == (1, 2, 300)


def test_model_module_has_no_io_printing_or_transformers():
    tree = ast.parse(inspect.getsource(model_module))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "transformers" not in imported
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"print", "open"}


def test_sdpa_matches_explicit_softmax_attention():
    # Independent check of the attention maths: softmax(QK^T / sqrt(D) + causal) V with repeated KV heads.
    model = LlamaForCausalLM(tiny_config()).eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 7, 64)
    pos = torch.arange(7)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        y = attn(x, (cos, sin))
        q = attn.q_proj(x).view(1, 7, 4, 16).transpose(1, 2)
        k = attn.k_proj(x).view(1, 7, 2, 16).transpose(1, 2)
        v = attn.v_proj(x).view(1, 7, 2, 16).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-1, -2) / 4.0 + torch.full((7, 7), float("-inf")).triu(1)
        expected = attn.o_proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(1, 7, 64))
    # SDPA's fused softmax against the written-out one: measured 4.5e-8 (outputs up to 0.38)
    torch.testing.assert_close(y, expected, rtol=0, atol=2e-7)


def test_transformers_version_is_the_one_we_check_against():
    assert transformers.__version__.split(".")[0] == "5"
