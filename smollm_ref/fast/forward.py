"""The fast forward: packed weights, torch's fused RMSNorm, SDPA's grouped-query attention, an MLP that
recomputes its product in backward, and per-block compile; logits and the fused loss on top."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import LlamaForCausalLM, rotate_half
from .loss import Workspace, chunked_cross_entropy, linear_cross_entropy
from .packing import PackCache, PackedLayer, PackedWeights, linear, pack_weights


def unsupported(model: LlamaForCausalLM, training: bool | None = None) -> str | None:
    """Why the fast paths (`FastForward`'s logits and losses, its compiled block, `FastGenerator`) would not
    compute what `model` computes, as a phrase; None when they compute the same function.

    training: the mode to judge (default: `model.training`, the mode the reference reads). The one thing the
    fast paths leave out is attention dropout, which the reference applies in training mode only; every other
    field the reference reads (biases, untied head, RMSNorm eps, RoPE theta, head_dim, the padding row of
    the embedding, -100 labels) the fast paths read too, and the tests check each against the reference."""
    training = model.training if training is None else training
    # What each attention module applies, as the reference reads it (the config's value, unless changed since).
    dropout = max((layer.self_attn.attention_dropout for layer in model.model.layers), default=0.0)
    if training and dropout > 0:
        return f"attention_dropout {dropout:g} is applied in training mode and the fast paths have no attention dropout"
    return None


def refuse_unsupported(model: LlamaForCausalLM, who: str) -> None:
    """A ValueError naming what `who` (a fast path) would compute differently from `model`, if anything."""
    reason = unsupported(model)
    if reason is not None:
        raise ValueError(
            f"{who} would not compute what this model computes: {reason}; call model.eval() for inference, "
            "or train with the reference model (the trainer's --no-fast)"
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`LlamaRMSNorm` of x (..., C) with weight (C,), in x's dtype: x / sqrt(mean(x^2) + eps) * weight."""
    # torch's fused RMSNorm: one kernel forward and one backward where the reference's seven element-wise
    # ops make fourteen (4x faster on CPU at 4x512x576). Float32 inputs (the mixed-precision residual)
    # give the reference's values to rounding; bf16 inputs are normalised in float32 inside the kernel and
    # the weight multiply is not rounded separately, a difference inside the bf16 envelope.
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated in cos's dtype (float32 in mixed precision, as under autocast)."""
    x = x.to(cos.dtype)
    return x * cos + rotate_half(x) * sin


def rope_table(config: ModelConfig, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, D) for positions 0..length-1, computed as `LlamaRotaryEmbedding` does."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    freqs = torch.arange(length, device=device).float()[:, None] * inv_freq  # (length, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def decoder_layer(x, p: PackedLayer, config: ModelConfig, dtype: torch.dtype, rotate, attend):
    """One decoder layer. x (B, T, C) in the residual dtype; rotate(q, k) applies RoPE to the (B, H, T, D)
    and (B, K, T, D) heads; attend(q, k, v) returns (B, H, T, D) and is where a cache gets written."""
    b, t, _ = x.shape
    h_, k_, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    h = rms_norm(x, p.ln1, config.rms_norm_eps).to(dtype)
    q, k, v = linear(h, p.qkv, p.qkv_bias).split([h_ * d, k_ * d, k_ * d], dim=-1)
    q, k = rotate(q.view(b, t, h_, d).transpose(1, 2), k.view(b, t, k_, d).transpose(1, 2))
    y = attend(q, k, v.view(b, t, k_, d).transpose(1, 2))  # (B, H, T, D)
    x = x + linear(y.transpose(1, 2).reshape(b, t, h_ * d), p.o, p.o_bias)
    h = rms_norm(x, p.ln2, config.rms_norm_eps).to(dtype)
    return x + _mlp_out(linear(h, p.gate_up, p.gate_up_bias), p.down, p.down_bias)


class _SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(gate) * up) from the gate|up projection, keeping only gate|up for backward.

    Autograd would keep silu(gate) and the product as well: two more (B, T, I) tensors per layer, 380 MB
    of a 4x512 bf16 step on SmolLM2-135M. Backward recomputes them with the forward's own ops (an
    elementwise pass, ~1% of the layer's work) and applies the same derivative ops autograd would, so
    values and gradients are unchanged."""

    @staticmethod
    def forward(ctx, gate_up, weight, bias):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        gate_up, weight = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        prod = act * up
        flat = grad_y.reshape(-1, grad_y.shape[-1])  # (N, C)
        grad_w = flat.t() @ prod.reshape(-1, prod.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_prod = grad_y @ weight  # (..., I)
        grad_gate = torch.ops.aten.silu_backward(grad_prod * up, gate)
        return torch.cat([grad_gate, grad_prod * act], dim=-1), grad_w, grad_b


def _mlp_out(gate_up: torch.Tensor, down: torch.Tensor, down_bias: torch.Tensor | None) -> torch.Tensor:
    """down(silu(gate) * up); under grad through `_SwiGLUDown`, which holds less for backward."""
    if torch.is_grad_enabled() and (gate_up.requires_grad or down.requires_grad):
        return _SwiGLUDown.apply(gate_up, down, down_bias)
    gate, up = gate_up.chunk(2, dim=-1)
    return linear(F.silu(gate) * up, down, down_bias)


def elementwise_rope(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
    """The `rotate(q, k)` that `decoder_layer` takes: `apply_rotary_pos_emb` with cos, sin (T, D), computed in
    their dtype and returned in `dtype`, for q (B, H, T, D) and k (B, K, T, D)."""
    return lambda q, k: (_rope(q, cos, sin).to(dtype), _rope(k, cos, sin).to(dtype))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, D) over k, v (B, K, S, D), causal when T > 1 (the last
    T of the S positions are q's), the K key/value heads shared by H / K query heads each: (B, H, T, D)."""
    # SDPA's grouped-query mode reads each KV head for its G query heads: no repeat_kv copies.
    t, d = q.shape[2], q.shape[3]
    return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=d**-0.5, enable_gqa=k.shape[1] != q.shape[1])


def _block(x, p: PackedLayer, cos, sin, config: ModelConfig, dtype: torch.dtype):
    """One decoder layer without a cache (training and scoring); cos/sin (T, D). The unit that compiles."""
    return decoder_layer(x, p, config, dtype, elementwise_rope(cos, sin, dtype), causal_attention)


class FastForward:
    """A faster forward of a reference model: packed weights, GQA attention, optional per-block compile.

    dtype: compute dtype of matmuls and attention (default: the parameters' dtype). When it is lower
    than the parameters' dtype this is autocast-style mixed precision (float32 residual and norms).
    compile: `torch.compile` one decoder block (the same compiled code serves every layer).
    chunk_size: rows of logits the loss holds at once (default 512 on CPU, 4096 on CUDA).
    ValueError, here and at every call, where the model in its present mode computes something the fast
    forward does not (`unsupported`: attention dropout in training mode).
    """

    def __init__(
        self, model: LlamaForCausalLM, dtype: torch.dtype | None = None, compile: bool = False, chunk_size: int | None = None
    ):
        refuse_unsupported(model, "FastForward")
        self.model = model
        self.config = model.config
        self.dtype = dtype or model.lm_head.weight.dtype
        # Rows of logits per loss chunk: 512 x 49152 float32 is 100 MB on CPU; a GPU wants bigger matmuls.
        self.chunk_size = chunk_size or (4096 if model.lm_head.weight.is_cuda else 512)
        self.compiled = compile
        self.block: Callable = torch.compile(_block, dynamic=False) if compile else _block
        self._rope: dict = {}
        self._weights = PackCache(model)  # the packed weights kept for inference
        self.workspace = Workspace()  # the loss's saved gradient buffer, reused from step to step

    def packed(self, rows: int | None = None) -> PackedWeights:
        """Under grad: packed afresh, inside the autograd graph (the weights change every step). Without
        grad: packed once and reused until a parameter's version counter moves (an update in place); with
        `rows`, in the layouts fastest on this machine for that many rows (`packing.choose_layouts`)."""
        if torch.is_grad_enabled():
            return pack_weights(self.model, self.dtype)
        return self._weights.get(self.dtype, rows)

    def _rope_for(self, t: int, device, dtype):
        key = (t, str(device), dtype)
        if key not in self._rope:
            self._rope = {key: rope_table(self.config, t, dtype, device)}
        return self._rope[key]

    def hidden(self, input_ids: torch.Tensor, packed: PackedWeights | None = None) -> torch.Tensor:
        """(B, T) -> final-norm hidden states (B, T, C) in the compute dtype. No padding, no cache.
        ValueError where the model, in its present mode, computes something else (`unsupported`): the mode
        can change after this FastForward was built."""
        refuse_unsupported(self.model, "FastForward")
        packed = packed or self.packed()
        x = F.embedding(input_ids, packed.embed, packed.padding_idx)  # (B, T, C), the residual dtype
        cos, sin = self._rope_for(input_ids.shape[1], input_ids.device, x.dtype)
        for p in packed.layers:
            x = self.block(x, p, cos, sin, self.config, self.dtype)
        return rms_norm(x, packed.norm, self.config.rms_norm_eps).to(self.dtype)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, V) logits in the compute dtype, as the reference gives under autocast. Without
        grad (eager), each weight in the layout measured fastest here for B x T rows (row-major under compile)."""
        rows = None if self.compiled else input_ids.numel()
        packed = self.packed(rows)
        return linear(self.hidden(input_ids, packed), packed.lm_head)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The reference's `model(input_ids, labels=labels).loss`, without the float32 logits."""
        packed = self.packed()
        return chunked_cross_entropy(self.hidden(input_ids, packed), packed.lm_head, labels, self.chunk_size, self.workspace)

    def lm_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`train.lm_loss(model, inputs, targets)`: targets already shifted (row t predicts targets[t])."""
        packed = self.packed()
        return linear_cross_entropy(self.hidden(inputs, packed), packed.lm_head, targets, self.chunk_size, self.workspace)
