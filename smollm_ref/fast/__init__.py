"""Fast paths for training and decoding, kept apart from the readable reference in `model.py`.

Nothing here owns parameters: every function reads the reference `LlamaForCausalLM`'s own Parameters
(same state dict, same optimizer), so the reference and the fast path are two ways of running one model.
What makes them faster, and why each is safe:

- `pack_weights`: q/k/v and gate/up weights concatenated and cast to the compute dtype once per step,
  instead of autocast casting every weight at every op (and again in backward). The cast is part of the
  autograd graph, so gradients still land, in float32, on the reference Parameters.
- `chunked_cross_entropy`: the lm_head matmul, log-softmax and their gradients done a chunk of rows at a
  time in one pass, so the (B, T, V) float32 logits (400 MB at 4x512 tokens) never exist. It computes the
  gradient in the forward pass (the loss is the last op of the graph), as Liger's fused linear
  cross-entropy does. One chunk's buffers serve every chunk, and the saved (N, V) gradient is leased
  from a `Workspace` kept across steps: on CPU a fresh 100 MB buffer costs more in page faults than
  the arithmetic done in it.
- `_SwiGLUDown`: the MLP keeps only gate|up for backward and recomputes silu(gate) * up there (two
  (B, T, I) activations fewer per layer, the same gradients bit for bit).
- Attention uses SDPA's grouped-query mode; the residual stream stays float32 in mixed precision, as it
  does under autocast, so the numerics are autocast's.
- `StaticKVCache` + `decode_step`: a preallocated cache and a decode step with fixed shapes, which
  `torch.compile` can turn into one graph (and CUDA graphs on GPU).
- `prepack_for_cpu`: eager CPU decoding multiplies by weights reordered once into oneDNN's blocked
  layout, which streams them from memory 1.5-2.5x faster than `F.linear` does at batch 1 to 8.

Mixed precision here means what `torch.autocast` means for this model: matmuls and attention in the
low-precision dtype, norms, RoPE and the residual stream in float32, loss in float32.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .model import LlamaForCausalLM, rotate_half
from .sampling import check_args, sample_next

IGNORE_INDEX = -100


# ---- loss -------------------------------------------------------------------------------------------


class Workspace:
    """Buffers kept from one step to the next, each leased to one user at a time.

    On CPU, glibc hands allocations over 32 MB straight back to the kernel when they are freed, so a
    fresh (2048, 49152) bf16 buffer costs ~50 ms of page faults every step. The loss leases its saved
    (N, V) gradient from here in forward and gives it back at the end of backward; a second forward
    before that backward finds the workspace empty and allocates its own."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """A buffer of exactly `shape`, the caller's until it `give`s it back."""
        buf = self._buffers.pop(name, None)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != torch.device(device):
            del buf  # free the old one first: peak memory holds one, not two
            buf = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def give(self, name: str, buf: torch.Tensor) -> None:
        self._buffers[name] = buf


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over valid rows of CE(hidden @ weight.T, targets), holding float32 log-probabilities for only
    `chunk_size` rows at a time.

    What autocast's graph keeps for backward, the (N, V) gradient of the logits in the matmul dtype, is
    kept here too, but as softmax - onehot without the 1/n scale: a per-row scale commutes with both
    backward matmuls, so it is applied to the (N, C) side instead of to N*V elements."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, workspace: Workspace | None):
        n, v = hidden.shape[0], weight.shape[0]
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum()
        safe = targets.masked_fill(~valid, 0)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # Leased from the workspace until backward has read it; autograd's version check on saved tensors
        # would also catch a later forward writing into it before an earlier graph's (retained) backward.
        grad_logits = (workspace or Workspace()).take("grad_logits", (n, v), hidden.dtype, hidden.device) if need_grad else None
        ctx.workspace = workspace
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        # One chunk's logits and their float32 copy, reused by every chunk of this call, freed at its end
        # (kept across steps they would sit on top of the backward's peak).
        c = min(chunk_size, n)
        logits_buf = torch.empty((c, v), dtype=hidden.dtype, device=hidden.device)
        f32_buf = logits_buf if hidden.dtype == torch.float32 else torch.empty((c, v), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            r = h.shape[0]
            # transformers' loss upcasts the (possibly bf16) logits to float32 before log-softmax: same
            # here. log_softmax written out as max, exp in place, sum: one float32 buffer, no temporaries.
            logits = torch.mm(h, weight.t(), out=logits_buf[:r])
            f = logits if logits.dtype == torch.float32 else f32_buf[:r].copy_(logits)
            t = safe[rows, None]  # (r, 1)
            f.sub_(f.amax(dim=-1, keepdim=True))  # shifted logits, max 0
            picked = f.gather(1, t).squeeze(1)  # shifted logit of the target
            f.exp_()
            total = f.sum(dim=-1)  # (r,)
            logp_t = picked - total.log()  # log-probability of the target
            nll[rows] = -logp_t
            if need_grad:
                g = grad_logits[rows]
                g.copy_(f.div_(total[:, None]))  # softmax, rounded once to the matmul dtype
                # p - 1 at the target, formed in float32 before rounding (p near 1 would round to 0 first)
                g.scatter_(1, t, (logp_t.exp() - 1.0)[:, None].to(g.dtype))
        # Ignored rows get scale 0; n_valid == 0 gives 0/0 = nan, as F.cross_entropy does.
        row_scale = valid.float() / n_valid.float()  # (N,)
        ctx.save_for_backward(hidden, weight, grad_logits, row_scale)
        return (torch.where(valid, nll, 0.0) * row_scale).sum()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, grad_logits, row_scale = ctx.saved_tensors
        scale = (row_scale * grad_out)[:, None]  # (N, 1)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = ((grad_logits @ weight).float() * scale).to(hidden.dtype)  # (N, C)
        if ctx.needs_input_grad[1]:
            grad_w = grad_logits.t() @ (hidden.float() * scale).to(hidden.dtype)  # (V, C), as autocast's backward
        if ctx.workspace is not None:
            ctx.workspace.give("grad_logits", grad_logits)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    workspace: Workspace | None = None,
):
    """`F.cross_entropy(lm_head(hidden).float(), targets)` (mean, -100 ignored) without the (B, T, V) logits.

    hidden (..., C); lm_head_weight (V, C); targets (...) aligned with hidden (row i's target is
    targets[i], no shift). Gradients flow to hidden and the weight, each in its own dtype (a bf16 weight
    copy gets a bf16 gradient, as under autocast, which autograd then casts onto the float32 Parameter).
    workspace: where the saved gradient buffer is leased from and returned to across calls (see
    `Workspace`); without it, a fresh buffer per call."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(flat, lm_head_weight, targets.reshape(-1), chunk_size, workspace)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    workspace: Workspace | None = None,
):
    """`model.causal_lm_loss(lm_head(hidden), labels)` without the (B, T, V) logits: labels (B, T) are
    unshifted, -100 ignored, position t predicts labels[t + 1] (transformers' ForCausalLMLoss)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must match hidden's leading dims {tuple(hidden.shape[:-1])}")
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    return linear_cross_entropy(hidden, lm_head_weight, targets, chunk_size, workspace)


# ---- packed weights ---------------------------------------------------------------------------------


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


# ---- the forward pass -------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
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


def _layer(x, p: PackedLayer, config: ModelConfig, dtype: torch.dtype, rotate, attend):
    """One decoder layer. x (B, T, C) in the residual dtype; rotate(q, k) applies RoPE to the (B, H, T, D)
    and (B, K, T, D) heads; attend(q, k, v) returns (B, H, T, D) and is where a cache gets written."""
    b, t, _ = x.shape
    h_, k_, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    h = _rms_norm(x, p.ln1, config.rms_norm_eps).to(dtype)
    q, k, v = _linear(h, p.qkv, p.qkv_bias).split([h_ * d, k_ * d, k_ * d], dim=-1)
    q, k = rotate(q.view(b, t, h_, d).transpose(1, 2), k.view(b, t, k_, d).transpose(1, 2))
    y = attend(q, k, v.view(b, t, k_, d).transpose(1, 2))  # (B, H, T, D)
    x = x + _linear(y.transpose(1, 2).reshape(b, t, h_ * d), p.o, p.o_bias)
    h = _rms_norm(x, p.ln2, config.rms_norm_eps).to(dtype)
    return x + _mlp_out(_linear(h, p.gate_up, p.gate_up_bias), p.down, p.down_bias)


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
    return _linear(F.silu(gate) * up, down, down_bias)


def _elementwise_rope(cos, sin, dtype):
    return lambda q, k: (_rope(q, cos, sin).to(dtype), _rope(k, cos, sin).to(dtype))


def _causal_attention(q, k, v):
    # SDPA's grouped-query mode reads each KV head for its G query heads: no repeat_kv copies.
    t, d = q.shape[2], q.shape[3]
    return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=d**-0.5, enable_gqa=k.shape[1] != q.shape[1])


def _block(x, p: PackedLayer, cos, sin, config: ModelConfig, dtype: torch.dtype):
    """One decoder layer without a cache (training and scoring); cos/sin (T, D). The unit that compiles."""
    return _layer(x, p, config, dtype, _elementwise_rope(cos, sin, dtype), _causal_attention)


class FastForward:
    """A faster forward of a reference model: packed weights, GQA attention, optional per-block compile.

    dtype: compute dtype of matmuls and attention (default: the parameters' dtype). When it is lower
    than the parameters' dtype this is autocast-style mixed precision (float32 residual and norms).
    compile: `torch.compile` one decoder block (the same compiled code serves every layer).
    chunk_size: rows of logits the loss holds at once (default 512 on CPU, 4096 on CUDA).
    """

    def __init__(
        self, model: LlamaForCausalLM, dtype: torch.dtype | None = None, compile: bool = False, chunk_size: int | None = None
    ):
        self.model = model
        self.config = model.config
        self.dtype = dtype or model.lm_head.weight.dtype
        # Rows of logits per loss chunk: 512 x 49152 float32 is 100 MB on CPU; a GPU wants bigger matmuls.
        self.chunk_size = chunk_size or (4096 if model.lm_head.weight.is_cuda else 512)
        self.compiled = compile
        self.block: Callable = torch.compile(_block, dynamic=False) if compile else _block
        self._rope: dict = {}
        self._packed: tuple | None = None  # (parameter versions, PackedWeights) kept for inference
        self.workspace = Workspace()  # the loss's saved gradient buffer, reused from step to step

    def packed(self, prepacked: bool = False) -> PackedWeights:
        """Under grad: packed afresh, inside the autograd graph (the weights change every step). Without
        grad: packed once and reused until a parameter's version counter moves (an update in place);
        prepacked: also reordered for oneDNN on CPU (`prepack_for_cpu`), for `logits`."""
        if torch.is_grad_enabled():
            return pack_weights(self.model, self.dtype)
        key = (tuple(p._version for p in self.model.parameters()), prepacked)
        if self._packed is None or self._packed[0] != key:
            self._packed = None  # one cached copy at a time
            packed = pack_weights(self.model, self.dtype)
            self._packed = (key, prepack_for_cpu(packed) if prepacked else packed)
        return self._packed[1]

    def _rope_for(self, t: int, device, dtype):
        key = (t, str(device), dtype)
        if key not in self._rope:
            self._rope = {key: rope_table(self.config, t, dtype, device)}
        return self._rope[key]

    def hidden(self, input_ids: torch.Tensor, packed: PackedWeights | None = None) -> torch.Tensor:
        """(B, T) -> final-norm hidden states (B, T, C) in the compute dtype. No padding, no cache."""
        packed = packed or self.packed()
        x = F.embedding(input_ids, packed.embed)  # (B, T, C), the residual dtype
        cos, sin = self._rope_for(input_ids.shape[1], input_ids.device, x.dtype)
        for p in packed.layers:
            x = self.block(x, p, cos, sin, self.config, self.dtype)
        return _rms_norm(x, packed.norm, self.config.rms_norm_eps).to(self.dtype)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, V) logits in the compute dtype, as the reference gives under autocast. Without
        grad on CPU (eager), through oneDNN-prepacked weights: 10-25% faster matmuls at 2048 rows here."""
        packed = self.packed(prepacked=not self.compiled)
        return _linear(self.hidden(input_ids, packed), packed.lm_head)

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The reference's `model(input_ids, labels=labels).loss`, without the float32 logits."""
        packed = self.packed()
        return chunked_cross_entropy(self.hidden(input_ids, packed), packed.lm_head, labels, self.chunk_size, self.workspace)

    def lm_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`train.lm_loss(model, inputs, targets)`: targets already shifted (row t predicts targets[t])."""
        packed = self.packed()
        return linear_cross_entropy(self.hidden(inputs, packed), packed.lm_head, targets, self.chunk_size, self.workspace)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """`torch.optim.AdamW` with the fused kernel where this torch has it for the parameters' device."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


# ---- decoding ---------------------------------------------------------------------------------------


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
    return _linear(_rms_norm(x[:, -1], packed.norm, config.rms_norm_eps).to(packed.dtype), packed.lm_head)  # (B, V)


def decode_step(packed: PackedWeights, config: ModelConfig, cache: StaticKVCache, tokens, pos, cos_table, sin_table):
    """One new token per row at position `pos` (a 0-d long tensor): writes its keys and values into the
    cache and returns the (B, V) logits. Every shape is fixed, so this compiles to one graph."""
    x = F.embedding(tokens, packed.embed)  # (B, 1, C)
    index = pos.reshape(1)
    # index_select, not cos_table[pos]: a tensor index would make the shape depend on data for compile.
    rotate = _elementwise_rope(cos_table.index_select(0, index), sin_table.index_select(0, index), packed.dtype)
    valid = torch.arange(cache.max_len, device=tokens.device) <= pos  # (S,)
    for i, p in enumerate(packed.layers):
        x = _layer(x, p, config, packed.dtype, rotate, lambda q, k, v, i=i: _attend_static(q, k, v, cache, i, index, valid))
    return _final_logits(x, packed, config)


def _forward_cached(packed: PackedWeights, config: ModelConfig, cache: StaticKVCache, tokens, pos: int, tables):
    """Eager prefill (pos 0, T tokens) or decode (T == 1) at a Python-int position: keys and values
    written to cache[..., pos:pos+T, :], attention over the filled prefix only. Returns (B, V) logits."""
    cos_table, sin_table, matrices = tables
    t = tokens.shape[1]
    x = F.embedding(tokens, packed.embed)  # (B, T, C)
    if t == 1:
        r = matrices[pos]  # (D, D), float32: a bf16 matmul this small is slower than casting around one

        def rotate(q, k):
            return (q.to(r.dtype) @ r).to(q.dtype), (k.to(r.dtype) @ r).to(k.dtype)
    else:
        rotate = _elementwise_rope(cos_table[pos : pos + t], sin_table[pos : pos + t], packed.dtype)
    for i, p in enumerate(packed.layers):

        def attend(q, k, v, i=i):
            cache.k[i, :, :, pos : pos + t] = k
            cache.v[i, :, :, pos : pos + t] = v
            return _causal_attention(q, cache.k[i, :, :, : pos + t], cache.v[i, :, :, : pos + t])

        x = _layer(x, p, config, packed.dtype, rotate, attend)
    return _final_logits(x, packed, config)


class FastGenerator:
    """KV-cached generation with a static cache, for one model. Eager: attention over the filled prefix
    of the cache, RoPE as one matmul. compile: a fixed-shape decode step over the whole cache, compiled.

    Greedy output equals `generate.generate` (float32: token for token on the tested configs).
    compile: `torch.compile` the decode step (on CUDA with CUDA graphs, mode "reduce-overhead").
    Weights are packed once and repacked only when a parameter changed (its version counter moved).
    No padding: prompts of one batch must have the same length (use `generate.generate` otherwise).
    """

    def __init__(self, model: LlamaForCausalLM, compile: bool = False):
        self.model = model
        self.config = model.config
        self._packed: PackedWeights | None = None
        self._versions: tuple | None = None
        self.compiled = compile
        self.cuda_graphs = compile and model.lm_head.weight.device.type == "cuda"
        if compile:
            mode = "reduce-overhead" if self.cuda_graphs else None
            self._step = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
        self._tables: dict = {}
        self._caches: dict = {}

    def packed(self) -> PackedWeights:
        versions = tuple(p._version for p in self.model.parameters())
        if self._packed is None or versions != self._versions:
            with torch.no_grad():
                self._packed = pack_weights(self.model)
                if not self.compiled:
                    self._packed = prepack_for_cpu(self._packed)
            self._versions = versions
            if self.cuda_graphs:
                # CUDA graphs copy every input that does not have a static address at each replay: the
                # weights must not be among them.
                for t in _tensors(self._packed):
                    torch._dynamo.mark_static_address(t)
        return self._packed

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
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same contract as `generate.generate` (without padding): (B, T) -> (B, T + n)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("FastGenerator does not take padded batches; use smollm_ref.generate.generate for those")
        check_args(self.model, input_ids, max_new_tokens, temperature, top_k, top_p)
        if max_new_tokens == 0:
            return input_ids
        packed = self.packed()
        device = input_ids.device
        eos = eos_token_id if eos_token_id is not None else self.config.eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=device, dtype=torch.long)
        b, t = input_ids.shape
        max_len = t + max_new_tokens
        # The residual stream runs in the embedding's dtype; cos/sin follow it, as in the reference.
        tables = self._rope(max_len, device, packed.embed.dtype)
        cache = self._cache(b, max_len, packed.dtype, device)
        logits = _forward_cached(packed, self.config, cache, input_ids, 0, tables)
        unfinished = torch.ones(b, dtype=torch.bool, device=device)
        steps = []
        pos = torch.tensor(t, device=device) if self.compiled else t
        for i in range(max_new_tokens):
            next_tokens = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_ids.numel():
                next_tokens = torch.where(unfinished, next_tokens, eos_ids[0])
                unfinished &= ~torch.isin(next_tokens, eos_ids)
            steps.append(next_tokens)
            if i == max_new_tokens - 1 or (eos_ids.numel() and not unfinished.any()):
                break
            if self.compiled:
                logits = self._step(packed, self.config, cache, next_tokens[:, None], pos, tables[0], tables[1])
                if self.cuda_graphs:
                    logits = logits.clone()  # CUDA-graph outputs are overwritten by the next replay
            else:
                logits = _forward_cached(packed, self.config, cache, next_tokens[:, None], pos, tables)
            pos += 1
        return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


def _tensors(packed: PackedWeights) -> list[torch.Tensor]:
    out = [packed.embed, packed.norm, packed.lm_head]
    for layer in packed.layers:
        out += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return out


_GENERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fast_generate(model: LlamaForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """`FastGenerator(model).generate(...)` with one eager FastGenerator kept per model (packed weights and
    cache reused across calls, repacked when the weights change). Same arguments as `generate.generate`."""
    if model not in _GENERATORS:
        _GENERATORS[model] = FastGenerator(model)
    return _GENERATORS[model].generate(input_ids, max_new_tokens, **kwargs)
