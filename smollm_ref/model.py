"""SmolLM2: a LLaMA-architecture decoder, written to be the same function as transformers' `LlamaForCausalLM`.

Module and parameter names are transformers' own (`model.layers.N.self_attn.q_proj.weight`, ...), so a
transformers checkpoint loads with `strict=True`, no renaming and no permutation. Where transformers fixes
an order of floating-point operations (RMSNorm in float32, RoPE's `rotate_half`, the loss), this file
follows it, so that on CPU in float32 the two agree bit for bit. This is the readable reference path;
fast paths live in `smollm_ref.fast` and are checked against it.

Shapes: B batch, T new tokens, S keys (cached + new), H query heads, K key/value heads, D head dim, C hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class LlamaRMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019). Variance in float32, cast back, then scale: the
    cast happens before the weight multiply, as in transformers, which matters in bf16."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LlamaRotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer) in the `rotate_half` layout: dimension i pairs
    with i + D/2. `inv_freq` is a float32 buffer that `_apply` keeps float32 when the model is cast to
    bf16, and cos/sin are computed in float32 with autocast off, then cast to the activations' dtype."""

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would round inv_freq to 8 bits of mantissa and move every angle past
        # position ~256; keep it float32 whatever the module is cast to (device moves still apply).
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(device=self.inv_freq.device)
        return self

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
            cos, sin = emb.cos(), emb.sin()
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q: (B, H, T, D), k: (B, K, T, D), cos/sin: (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K*n_rep, S, D); KV head j serves query heads j*n_rep ... (j+1)*n_rep - 1."""
    if n_rep == 1:
        return x
    b, k, s, d = x.shape
    return x[:, :, None, :, :].expand(b, k, n_rep, s, d).reshape(b, k * n_rep, s, d)


class KVCache:
    """Keys and values of every layer seen so far, grown by concatenation along the sequence, as
    transformers' `DynamicCache` does. `generate` creates one; a forward pass given one appends to it."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def __len__(self) -> int:  # number of cached positions
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


class LlamaAttention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023) through `scaled_dot_product_attention`."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_key_value_groups
        self.attention_dropout = config.attention_dropout
        self.scaling = self.head_dim**-0.5
        c, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(c, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(c, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(c, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c, bias=bias)

    def forward(self, x, position_embeddings, attention_mask=None, kv_cache: KVCache | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        dropout = self.attention_dropout if self.training else 0.0
        if attention_mask is None:
            # Causal without padding. With T == S `is_causal` is the causal mask; a single new token
            # may see every cached key, so it needs no mask. (T > 1 with a cache gets an explicit
            # bottom-right mask from LlamaModel, never this branch.)
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=self.scaling, is_causal=t > 1, enable_gqa=self.num_key_value_groups > 1
            )
        else:
            k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=self.scaling)
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, H*D)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(c, i, bias=bias)
        self.up_proj = nn.Linear(c, i, bias=bias)
        self.down_proj = nn.Linear(i, c, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, position_embeddings, attention_mask=None, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), position_embeddings, attention_mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """Boolean (B|1, 1, T, S) mask, True where a query may attend, or None where SDPA's own causal
    handling is exact (no padding and T == S, or a single new token).

    `attention_mask` is (B, S) with 1 for real tokens and 0 for padding, covering cached and new keys.
    Query i (absolute position S - T + i) sees keys j <= S - T + i: the bottom-right causal alignment.
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # all real tokens: identical to no mask, and lets SDPA use is_causal
    if attention_mask is None and (q_len == kv_len or q_len == 1):
        return None
    rows = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    mask = (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but there are {kv_len} keys "
                "(cached + new); pass a mask over the whole sequence so far"
            )
        mask = mask & attention_mask.bool()[:, None, None, :]
    return mask


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Boolean (B|1, 1, T, T) block-diagonal causal mask for rows that pack several sequences, or None where
    every row holds one sequence (then SDPA's `is_causal` is exact).

    A new sequence starts wherever a position does not follow the previous one by 1, e.g. position ids
    [0 1 2 0 1 0 1 2 3] pack three sequences; a query sees the keys of its own sequence up to itself. This is
    how transformers reads position ids given without an attention mask (`find_packed_sequence_indices` in
    `masking_utils`), so a packed row gets the same mask here and there.
    """
    first = position_ids[:, :1] - 1  # so that the first token continues "its predecessor"
    sequence = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)  # (B|1, T) sequence of each token
    if not bool((sequence[:, -1] != 0).any()):
        return None
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()  # (T, T)
    same_sequence = sequence[:, :, None] == sequence[:, None, :]  # (B|1, T, T)
    return (causal & same_sequence)[:, None]  # (B|1, 1, T, T)


def positions_from_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Position of each of the last `q_len` tokens counted from its row's first real token (left padding)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids = position_ids.clamp(min=0)  # padding slots get position 0; they are masked anyway
    return position_ids[:, -q_len:]


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None):
        x = self.embed_tokens(input_ids)  # (B, T, C)
        t = input_ids.shape[1]
        past = len(kv_cache) if kv_cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 4:
                raise ValueError("a 4D attention_mask comes with position_ids: the mask alone cannot say where each token is")
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, t)
            else:
                position_ids = torch.arange(past, past + t, device=x.device)[None, :]
        if attention_mask is not None and attention_mask.dim() == 4:
            # A mask of one's own, (B|1, 1, T, S) boolean, True where a query may attend, taken as it is
            # (transformers takes a 4D mask the same way); evaluation's shared-context rows pass one.
            mask = attention_mask
        elif attention_mask is None and kv_cache is None and position_ids is not None:
            # Packing: position ids that restart within a row (several sequences in one row) and no padding
            # mask get a block-diagonal causal mask; plain 0..T-1 positions get None, as before.
            mask = packed_causal_mask(position_ids)
        else:
            mask = build_attention_mask(attention_mask, t, past + t, x.device)
        position_embeddings = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, position_embeddings, mask, kv_cache)
        return self.norm(x)


IGNORE_INDEX = -100  # a label the loss skips: PyTorch's cross_entropy default, and transformers' convention


class CausalLMOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V), or (B, logits_to_keep, V)
    loss: torch.Tensor | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy; position t predicts labels[t + 1]. Logits are upcast to float32 and
    labels shifted by padding, in the same order as transformers' `ForCausalLMLoss`."""
    logits = logits.float()
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), shift_labels.view(-1), ignore_index=ignore_index)


def causal_lm_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token cross-entropies, number of tokens scored), with `causal_lm_loss`'s shift:
    sum / count is its mean. An optimizer step over several micro-batches (or ranks) adds both up and
    divides once, so every trained token weighs the same however the tokens fall into micro-batches."""
    logits = logits.float()
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    total = F.cross_entropy(logits.view(-1, logits.shape[-1]), shift_labels.view(-1), ignore_index=ignore_index, reduction="sum")
    return total, (shift_labels != ignore_index).sum()


class LlamaForCausalLM(nn.Module):
    """The language model. With `tie_word_embeddings`, `lm_head.weight` *is* `model.embed_tokens.weight`
    (one Parameter), so the tie survives `.to()`, optimizer steps and `load_state_dict`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' initialisation: every Linear and the embedding N(0, initializer_range), biases
        zero, the padding row zero, RMSNorm weights one."""
        std = self.config.initializer_range
        for module in self.modules():
            if module is self.lm_head and self.config.tie_word_embeddings:
                continue  # the embedding's initialisation (padding row zero) is the tied weight's
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, LlamaRMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """input_ids (B, T); attention_mask (B, S) over cached + new tokens, 1 = real, 0 = padding;
        labels (B, T), -100 ignored; logits_to_keep > 0 computes logits for the last positions only.
        A 4D boolean attention_mask (B|1, 1, T, S), True where a query may attend, is used as given, with
        position_ids (B|1, T) (`smollm_ref.evaluate.scoring` shares a context among choices this way).
        Packed rows (several sequences per row, `smollm_ref.data.chat.pack`): position_ids (B|1, T) that restart at
        0 with each sequence, and no attention_mask or cache; attention then stays within each sequence."""
        h = self.model(input_ids, attention_mask, position_ids, kv_cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss)

    @torch.no_grad()
    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Change the vocabulary to `vocab_size` rows (e.g. for GPT-2's tokenizer plus special tokens):
        existing rows are kept, new ones drawn N(0, initializer_range), and `config.vocab_size` records it."""
        old = self.model.embed_tokens
        if vocab_size == old.num_embeddings:
            return
        self.config = self.config.replace(vocab_size=vocab_size)
        self.model.config = self.config
        keep = min(vocab_size, old.num_embeddings)
        embed = nn.Embedding(
            vocab_size, old.embedding_dim, self.config.pad_token_id, device=old.weight.device, dtype=old.weight.dtype
        )
        embed.weight.normal_(0.0, self.config.initializer_range)
        embed.weight[:keep] = old.weight[:keep]
        self.model.embed_tokens = embed
        head = nn.Linear(old.embedding_dim, vocab_size, bias=False, device=old.weight.device, dtype=old.weight.dtype)
        if self.config.tie_word_embeddings:
            head.weight = embed.weight
        else:
            head.weight.normal_(0.0, self.config.initializer_range)
            head.weight[:keep] = self.lm_head.weight[:keep]
        self.lm_head = head

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
