"""The model's weights fused (q|k|v, gate|up) and cast once, as the fast forward and decoder read them, and
the cache that keeps one packed copy until the weights change."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import LlamaForCausalLM
from . import tuning


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
    # The embedding's padding row, which its lookup sends no gradient (nn.Embedding's padding_idx), or None.
    padding_idx: int | None = None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or oneDNN's matmul when the weight is in oneDNN's layout (`to_layout(w, "onednn")`). A
    column-major weight needs nothing special: F.linear reads it as the contiguous (in, out) matrix it is."""
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
    return PackedWeights(
        embed=embed,
        layers=layers,
        norm=model.model.norm.weight,
        lm_head=lm_head,
        dtype=dtype,
        padding_idx=model.model.embed_tokens.padding_idx,
    )


# The ways a weight matrix can be laid out for inference. The same values and shape (out, in) in each; what
# differs is the order they are read in, hence the speed, which depends on the CPU (see `choose_layouts`).
LAYOUTS = ("row-major", "column-major", "onednn")
KINDS = ("qkv", "o", "gate_up", "down", "lm_head")  # the matmul weights of `PackedWeights`
STREAMING_ROWS = 16  # up to this many rows a matmul is bound by reading its weight (decoding)
TIMED_ROWS = 2048  # above STREAMING_ROWS, timed at the next power of two, at most this many rows
TIMED_HEAD_ROWS = 8192  # the lm_head's first rows, which compute-bound timing uses (the rate has converged)


def onednn_available(device: torch.device | str = "cpu") -> bool:
    return (
        torch.device(device).type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def to_layout(w: torch.Tensor, layout: str) -> torch.Tensor:
    """`w` (out, in) in `layout` (one of LAYOUTS), for inference only.

    row-major: as stored; F.linear streams it one output row at a time.
    column-major: the same (out, in) tensor with the in dimension outermost (`w.t().contiguous().t()`):
    F.linear then multiplies by a contiguous (in, out) matrix, a different BLAS kernel, which at one row
    streams wide matrices (q|k|v, gate|up, the lm_head) 10-25% faster than row-major on some CPUs.
    onednn: reordered once into oneDNN's blocked layout (CPU only); read by `linear` through oneDNN's
    matmul. What inductor's `freezing` does for compiled CPU models.
    Values differ between layouts only by summation order."""
    w = w.detach()
    if layout == "row-major":
        return w
    if layout == "column-major":
        return w.t().contiguous().t()
    if layout == "onednn":
        if not onednn_available(w.device):
            raise ValueError(f"layout 'onednn' needs oneDNN on the CPU; this weight is on {w.device} or torch has no oneDNN")
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
    raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")


def _kind_weights(packed: PackedWeights, kind: str) -> list[torch.Tensor]:
    return [packed.lm_head] if kind == "lm_head" else [getattr(p, kind) for p in packed.layers]


def relayout(packed: PackedWeights, layouts: dict[str, str]) -> PackedWeights:
    """`packed` with each kind of matmul weight (KINDS: qkv, o, gate_up, down, lm_head) in the layout
    `layouts` names for it (row-major where it names none). Norms, embedding and biases stay as they are."""
    converted = {kind: [to_layout(w, layouts.get(kind, "row-major")) for w in _kind_weights(packed, kind)] for kind in KINDS}
    layers = [
        PackedLayer(**{**vars(p), **{kind: converted[kind][i] for kind in KINDS if kind != "lm_head"}})
        for i, p in enumerate(packed.layers)
    ]
    head = converted["lm_head"][0]
    return PackedWeights(
        embed=packed.embed, layers=layers, norm=packed.norm, lm_head=head, dtype=packed.dtype, padding_idx=packed.padding_idx
    )


class _Trial:
    """One layout of one kind of weight, timed: a pass of `x` through every matrix of the kind (streaming), or
    through the first (compute-bound). Converts the weights at its first (untimed) call, not before: a choice
    found in a cache costs no conversion."""

    def __init__(self, weights: list[torch.Tensor], layout: str, x: torch.Tensor):
        self.weights, self.layout, self.x = weights, layout, x
        self.converted: list[torch.Tensor] | None = None

    def __call__(self) -> None:
        if self.converted is None:
            self.converted = [to_layout(w, self.layout) for w in self.weights]
        for w in self.converted:
            linear(self.x, w)


def choose_layouts(packed: PackedWeights, rows: int) -> dict[str, str]:
    """The fastest layout for each kind of matmul weight when multiplying `rows` rows (batch x tokens) at a
    time, timed on this machine with `tuning.fastest` (row-major, the reference layout, unless another is
    faster by the margin). Up to STREAMING_ROWS rows the timing is one pass over every matrix of the kind,
    as decoding reads them (larger than the CPU's caches); above it, one matrix (the lm_head's first
    TIMED_HEAD_ROWS rows) at the next power of two rows, at most TIMED_ROWS."""
    device = packed.lm_head.device
    layouts = [name for name in LAYOUTS if name != "onednn" or onednn_available(device)]
    streaming = rows <= STREAMING_ROWS
    # Which layout wins changes with the row count (oneDNN's lm_head: 20% faster than row-major at 256 rows
    # on an Intel Xeon, 6% slower at 2048), so compute-bound shapes are timed near their own size.
    timed_rows = rows if streaming else min(TIMED_ROWS, 1 << (rows - 1).bit_length())
    chosen = {}
    with torch.no_grad():
        for kind in KINDS:
            weights = _kind_weights(packed, kind)
            timed = weights if streaming else [weights[0][:TIMED_HEAD_ROWS] if kind == "lm_head" else weights[0]]
            out_f, in_f = timed[0].shape
            # A generator of its own: choosing must not move the global RNG that sampling and training use.
            x = torch.randn(timed_rows, in_f, generator=torch.Generator(device).manual_seed(0), device=device)
            x = x.to(packed.dtype)
            key = f"linear {out_f}x{in_f} {str(packed.dtype).removeprefix('torch.')} rows {timed_rows} matrices {len(timed)}"
            trials = {name: _Trial(timed, name, x) for name in layouts}
            chosen[kind] = tuning.fastest(key, trials, "row-major", device, repeats=5 if streaming else 3)
    return chosen


class PackCache:
    """One packed copy of a model's weights, reused until a parameter's version counter moves (an update in
    place: an optimizer step, `load_state_dict`) or another dtype or row count is asked for. Packed without
    grad: for inference only (under grad, `pack_weights` itself, inside the autograd graph)."""

    def __init__(self, model: LlamaForCausalLM):
        self.model = model
        self._key: tuple | None = None
        self._packed: PackedWeights | None = None

    def get(self, dtype: torch.dtype | None = None, rows: int | None = None) -> PackedWeights:
        """`pack_weights(model, dtype)`; with `rows`, each kind of weight in the layout that multiplies that
        many rows fastest on this machine (`choose_layouts`), else row-major (what compile takes)."""
        key = (tuple(p._version for p in self.model.parameters()), dtype, rows)
        if self._packed is None or self._key != key:
            self._packed = None  # one cached copy at a time
            with torch.no_grad():
                packed = pack_weights(self.model, dtype)
                self._packed = packed if rows is None else relayout(packed, choose_layouts(packed, rows))
            self._key = key
        return self._packed
