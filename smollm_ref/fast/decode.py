"""Fast decoding: a static KV cache, eager prefill and decode over its filled prefix, and a fixed-shape decode
step that compiles to one graph (CUDA graphs on GPU)."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import LlamaForCausalLM
from ..sampling import MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P, Sampler, SamplingParams, check_args, eos_ids, left_align
from .forward import causal_attention, decoder_layer, elementwise_rope, refuse_unsupported, rms_norm, rope_table
from .packing import PackCache, PackedWeights, linear


class StaticKVCache:
    """Keys and values of every layer in preallocated (L, B, K, S_max, D) buffers, written in place,
    so a decode step has the same shapes every time (what compile and CUDA graphs need)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len


def rope_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(S, D, D) matrices R with q @ R[pos] == q * cos[pos] + rotate_half(q) * sin[pos]: one matmul
    per token in eager decoding instead of seven element-wise ops (each costs ~10 us of dispatch)."""
    d = cos.shape[-1]
    half = torch.zeros(d, d, dtype=cos.dtype, device=cos.device)  # q @ half == rotate_half(q)
    idx = torch.arange(d // 2, device=cos.device)
    half[idx + d // 2, idx] = -1
    half[idx, idx + d // 2] = 1
    return torch.diag_embed(cos) + half[None] * sin[:, None, :]


def _attend_static(q, k, v, cache: StaticKVCache, i: int, index, valid):
    """Single-token attention over the whole static cache with the unwritten tail masked: fixed shapes,
    one graph under compile. Grouped-query by reshaping: the G = H/K queries of a KV head share its keys."""
    b, h, _, d = q.shape
    cache.k[i].index_copy_(2, index, k)
    cache.v[i].index_copy_(2, index, v.to(cache.v.dtype))
    kc, vc = cache.k[i], cache.v[i]  # (B, K, S, D)
    qg = q.reshape(b, kc.shape[1], h // kc.shape[1], d)  # (B, K, G, D)
    scores = (qg @ kc.transpose(-1, -2)).float() * d**-0.5  # (B, K, G, S)
    y = scores.masked_fill(~valid, float("-inf")).softmax(-1).to(vc.dtype) @ vc  # (B, K, G, D)
    return y.reshape(b, h, 1, d)


def _final_logits(x, packed: PackedWeights, config: ModelConfig):
    return linear(rms_norm(x[:, -1], packed.norm, config.rms_norm_eps).to(packed.dtype), packed.lm_head)  # (B, V)


def decode_step(packed: PackedWeights, config: ModelConfig, cache: StaticKVCache, tokens, pos, cos_table, sin_table):
    """One new token per row at position `pos` (a 0-d long tensor): writes its keys and values into the
    cache and returns the (B, V) logits. Every shape is fixed, so this compiles to one graph."""
    x = F.embedding(tokens, packed.embed)  # (B, 1, C)
    index = pos.reshape(1)
    # index_select, not cos_table[pos]: a tensor index would make the shape depend on data for compile.
    rotate = elementwise_rope(cos_table.index_select(0, index), sin_table.index_select(0, index), packed.dtype)
    valid = torch.arange(cache.max_len, device=tokens.device) <= pos  # (S,)
    for i, p in enumerate(packed.layers):
        x = decoder_layer(
            x, p, config, packed.dtype, rotate, lambda q, k, v, i=i: _attend_static(q, k, v, cache, i, index, valid)
        )
    return _final_logits(x, packed, config)


def forward_cached(packed: PackedWeights, config: ModelConfig, cache: StaticKVCache, tokens, pos: int, tables):
    """Eager prefill (pos 0, T tokens) or decode (T == 1, `_decode_one`) at a Python-int position: keys and
    values written to cache[..., pos:pos+T, :], attention over the filled prefix only. tokens (B, T); tables
    (cos, sin, matrices): `rope_table`'s (S, D) pair and its float32 `rope_matrices` (S, D, D), S >= pos + T.
    Returns the (B, V) logits of the last position."""
    cos_table, sin_table, matrices = tables
    t = tokens.shape[1]
    if t == 1:
        return _decode_one(packed, config, cache, tokens[:, 0], pos, matrices[pos])
    x = F.embedding(tokens, packed.embed)  # (B, T, C)
    rotate = elementwise_rope(cos_table[pos : pos + t], sin_table[pos : pos + t], packed.dtype)
    for i, p in enumerate(packed.layers):

        def attend(q, k, v, i=i):
            cache.k[i, :, :, pos : pos + t] = k
            cache.v[i, :, :, pos : pos + t] = v
            return causal_attention(q, cache.k[i, :, :, : pos + t], cache.v[i, :, :, : pos + t])

        x = decoder_layer(x, p, config, packed.dtype, rotate, attend)
    return _final_logits(x, packed, config)


def _decode_one(packed: PackedWeights, config: ModelConfig, cache: StaticKVCache, tokens, pos: int, r):
    """`decoder_layer`'s arithmetic for one token per row, with as few ops as it takes. A decode step reads every
    weight once and is bound by memory, but on CPU each op also costs a few microseconds of dispatch, ~60 ops
    a layer: so rows stay (B, C) with no time axis to transpose or copy, q and k are rotated by one matmul
    with r (D, D), the float32 RoPE matrix of `pos`, and keys and values are written to the cache by index."""
    b = tokens.shape[0]
    h_, k_, d, eps, dtype = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.rms_norm_eps,
        packed.dtype,
    )
    x = F.embedding(tokens, packed.embed)  # (B, C), the residual dtype
    for i, p in enumerate(packed.layers):
        qkv = linear(_to(rms_norm(x, p.ln1, eps), dtype), p.qkv, p.qkv_bias)  # (B, (H + 2K) D)
        qk = qkv[:, : (h_ + k_) * d].view(b, h_ + k_, d)
        qk = qk @ r if qk.dtype == r.dtype else (qk.to(r.dtype) @ r).to(dtype)  # (B, H + K, D), rotated
        cache.k[i, :, :, pos] = qk[:, h_:]
        cache.v[i, :, :, pos] = qkv[:, (h_ + k_) * d :].view(b, k_, d)
        y = causal_attention(qk[:, :h_, None], cache.k[i, :, :, : pos + 1], cache.v[i, :, :, : pos + 1])  # (B, H, 1, D)
        x = x + linear(y.view(b, h_ * d), p.o, p.o_bias)
        gate, up = linear(_to(rms_norm(x, p.ln2, eps), dtype), p.gate_up, p.gate_up_bias).chunk(2, dim=-1)
        x = x + linear(F.silu(gate) * up, p.down, p.down_bias)
    return linear(_to(rms_norm(x, packed.norm, eps), dtype), packed.lm_head)  # (B, V)


def _to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class FastGenerator:
    """KV-cached generation with a static cache, for one model. Eager: attention over the filled prefix
    of the cache, RoPE as one matmul, weights in the layouts measured fastest here for the batch size.
    compile: a fixed-shape decode step over the whole cache, compiled.

    Greedy output equals `generate.generate` (float32: token for token on the tested configs).
    compile: `torch.compile` the decode step (on CUDA with CUDA graphs, mode "reduce-overhead").
    Weights are packed once and repacked only when a parameter changed (its version counter moved).
    No padding: prompts of one batch must have the same length; a padded batch (either side) is refused
    with a ValueError (`generate.generate` takes those).
    """

    def __init__(self, model: LlamaForCausalLM, compile: bool = False):
        self.model = model
        self.config = model.config
        self._weights = PackCache(model)
        self._marked: PackedWeights | None = None  # the packed copy marked static for CUDA graphs
        self.compiled = compile
        self.cuda_graphs = compile and model.lm_head.weight.device.type == "cuda"
        if compile:
            mode = "reduce-overhead" if self.cuda_graphs else None
            self._step = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
        self._tables: dict = {}
        self._caches: dict = {}

    def packed(self, batch_size: int = 1) -> PackedWeights:
        """The weights as decoding reads them. Eager: each kind in the layout that streams fastest on this
        machine at `batch_size` rows (`packing.choose_layouts`); compiled: row-major, what compile takes."""
        packed = self._weights.get(rows=None if self.compiled else batch_size)
        if self.cuda_graphs and packed is not self._marked:
            # CUDA graphs copy every input that does not have a static address at each replay: the
            # weights must not be among them.
            for t in _tensors(packed):
                torch._dynamo.mark_static_address(t)
            self._marked = packed
        return packed

    def _cache(self, batch_size, max_len, dtype, device) -> StaticKVCache:
        # One cache per shape, reused across calls: a new cache would be a new static address, hence a
        # recompile. Stale entries past the current position are masked out, never read.
        key = (batch_size, max_len, dtype, str(device))
        if key not in self._caches:
            cache = StaticKVCache(self.config, batch_size, max_len, dtype, device)
            if self.cuda_graphs:
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
            self._caches = {key: cache}
        return self._caches[key]

    def _rope(self, length, device, dtype):
        key = (length, str(device), dtype)
        if key not in self._tables:
            cos, sin = rope_table(self.config, length, dtype, device)
            self._tables = {key: (cos, sin, rope_matrices(cos.float(), sin.float()))}
        return self._tables[key]

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = MAX_NEW_TOKENS,
        temperature: float = TEMPERATURE,
        top_k: int | None = TOP_K,
        top_p: float | None = TOP_P,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        sampling: SamplingParams | None = None,
    ) -> torch.Tensor:
        """Same contract as `generate.generate` (without padding): (B, T) -> (B, T + n); the sampling options
        as keywords or as one `sampling=SamplingParams(...)`, not both; ValueError for an argument no decode
        can run with, checked the same way (`sampling.check_args`), for padding, and where the model in its
        present mode computes something the fast decoder does not (attention dropout in training mode,
        `forward.unsupported`)."""
        refuse_unsupported(self.model, "FastGenerator")
        params = check_args(self.model, input_ids, sampling, max_new_tokens, temperature, top_k, top_p)
        eos = eos_ids(eos_token_id, self.config.eos_token_id)
        if attention_mask is not None and left_align(input_ids, attention_mask)[1] is not None:
            raise ValueError("FastGenerator does not take padded batches; use smollm_ref.generate.generate for those")
        max_new_tokens = params.max_new_tokens
        if max_new_tokens == 0:
            return input_ids
        packed = self.packed(input_ids.shape[0])
        device = input_ids.device
        b, t = input_ids.shape
        max_len = t + max_new_tokens
        # The residual stream runs in the embedding's dtype; cos/sin follow it, as in the reference.
        tables = self._rope(max_len, device, packed.embed.dtype)
        cache = self._cache(b, max_len, packed.dtype, device)
        logits = forward_cached(packed, self.config, cache, input_ids, 0, tables)
        pick = Sampler(params, eos, b, device, generator)
        steps = []
        pos = torch.tensor(t, device=device) if self.compiled else t
        for i in range(max_new_tokens):
            next_tokens = pick(logits)
            steps.append(next_tokens)
            if i == max_new_tokens - 1 or pick.finished:
                break
            if self.compiled:
                logits = self._step(packed, self.config, cache, next_tokens[:, None], pos, tables[0], tables[1])
                if self.cuda_graphs:
                    logits = logits.clone()  # CUDA-graph outputs are overwritten by the next replay
            else:
                logits = forward_cached(packed, self.config, cache, next_tokens[:, None], pos, tables)
            pos += 1
        return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


def _tensors(packed: PackedWeights) -> list[torch.Tensor]:
    out = [packed.embed, packed.norm, packed.lm_head]
    for layer in packed.layers:
        out += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return out


_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fast_generate(
    model: LlamaForCausalLM, input_ids: torch.Tensor, max_new_tokens: int = MAX_NEW_TOKENS, **kwargs
) -> torch.Tensor:
    """`FastGenerator(model).generate(...)` with one eager FastGenerator kept per model (packed weights and
    cache reused across calls, repacked when the weights change). Same arguments as `generate.generate`
    (`sampling=` among them), less `fast`."""
    if model not in _GENERATORS:
        _GENERATORS[model] = FastGenerator(model)
    return _GENERATORS[model].generate(input_ids, max_new_tokens, **kwargs)
