"""The model's weights fused (q|k|v, gate|up) and cast once, as the fast forward and decoder read them, and
the cache that keeps one packed copy until the weights change."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import LlamaForCausalLM


@dataclass
class PackedLayer:
    ln1: torch.Tensor  # (C,) input_layernorm, float32 (or the model's dtype)
    qkv: torch.Tensor  # ((H + 2K) * D, C)
    o: torch.Tensor  # (C, H * D)
    ln2: torch.Tensor  # (C,)
    gate_up: torch.Tensor  # (2I, C)
    down: torch.Tensor  # (C, I)
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


@dataclass
class PackedWeights:
    embed: torch.Tensor  # (V, C), the residual dtype (the lookup is not a matmul)
    layers: list[PackedLayer]
    norm: torch.Tensor  # (C,)
    lm_head: torch.Tensor  # (V, C), the compute dtype
    dtype: torch.dtype  # compute dtype of matmuls and attention


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or oneDNN's matmul when the weight was prepacked for the CPU (`prepack_for_cpu`)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _cat(tensors, dtype):
    if any(t is None for t in tensors):
        return None
    return torch.cat([t.to(dtype) for t in tensors])


def pack_weights(model: LlamaForCausalLM, dtype: torch.dtype | None = None) -> PackedWeights:
    """The model's weights fused (qkv, gate|up) and cast to `dtype` (default: the parameters' dtype).

    Differentiable: called under grad, backward sends the gradients to the reference Parameters. A tied
    lm_head is cast once and shared. Norm weights keep the parameters' dtype (norms run in float32)."""
    dtype = dtype or model.lm_head.weight.dtype
    layers = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        layers.append(
            PackedLayer(
                ln1=layer.input_layernorm.weight,
                qkv=_cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dtype),
                o=a.o_proj.weight.to(dtype),
                ln2=layer.post_attention_layernorm.weight,
                gate_up=_cat([m.gate_proj.weight, m.up_proj.weight], dtype),
                down=m.down_proj.weight.to(dtype),
                qkv_bias=_cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], dtype),
                o_bias=None if a.o_proj.bias is None else a.o_proj.bias.to(dtype),
                gate_up_bias=_cat([m.gate_proj.bias, m.up_proj.bias], dtype),
                down_bias=None if m.down_proj.bias is None else m.down_proj.bias.to(dtype),
            )
        )
    embed = model.model.embed_tokens.weight
    lm_head = model.lm_head.weight.to(dtype)
    return PackedWeights(embed=embed, layers=layers, norm=model.model.norm.weight, lm_head=lm_head, dtype=dtype)


def prepack_for_cpu(packed: PackedWeights) -> PackedWeights:
    """The matmul weights of `packed` reordered once into oneDNN's blocked layout (inference only).

    A decode step multiplies one row per sequence by every weight: it is a matrix-vector product,
    bound by how fast the weights stream from memory. On CPU, `F.linear` on a row-major (N, C) weight
    streams them at about 11 GB/s here; oneDNN's prepacked layout reaches 17-28 GB/s on the same shapes
    (the lm_head most of all), which is what inductor's `freezing` does for compiled CPU models. Values
    differ from `F.linear` only by summation order (~1e-7 relative in float32, none seen in bf16).
    Returns `packed` unchanged where this torch lacks the ops or the weights are not on the CPU."""
    if packed.lm_head.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return packed

    def pack(w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None)

    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018  (the op `_linear` will call)
        layers = [
            PackedLayer(**{**vars(p), "qkv": pack(p.qkv), "o": pack(p.o), "gate_up": pack(p.gate_up), "down": pack(p.down)})
            for p in packed.layers
        ]
        lm_head = pack(packed.lm_head)
    except (AttributeError, RuntimeError):  # ops missing from this torch, or a dtype oneDNN does not reorder
        return packed
    return PackedWeights(embed=packed.embed, layers=layers, norm=packed.norm, lm_head=lm_head, dtype=packed.dtype)


class PackCache:
    """One packed copy of a model's weights, reused until a parameter's version counter moves (an update in
    place: an optimizer step, `load_state_dict`) or another dtype or layout is asked for. Packed without
    grad: for inference only (under grad, `pack_weights` itself, inside the autograd graph)."""

    def __init__(self, model: LlamaForCausalLM):
        self.model = model
        self._key: tuple | None = None
        self._packed: PackedWeights | None = None

    def get(self, dtype: torch.dtype | None = None, prepacked: bool = False) -> PackedWeights:
        """`pack_weights(model, dtype)`, also `prepack_for_cpu`'d when `prepacked`."""
        key = (tuple(p._version for p in self.model.parameters()), dtype, prepacked)
        if self._packed is None or self._key != key:
            self._packed = None  # one cached copy at a time
            with torch.no_grad():
                packed = pack_weights(self.model, dtype)
                self._packed = prepack_for_cpu(packed) if prepacked else packed
            self._key = key
        return self._packed
