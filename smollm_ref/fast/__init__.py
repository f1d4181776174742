"""Fast paths for training and decoding, kept apart from the readable reference in `model.py`.

Nothing here owns parameters: every function reads the reference `LlamaForCausalLM`'s own Parameters
(same state dict, same optimizer), so the reference and the fast path are two ways of running one model.
`loss` holds the fused loss, `packing` the packed weights and their cache, `forward` the forward pass
(`FastForward`), `decode` the static-cache decoder (`FastGenerator`). What makes them faster, and why each
is safe:

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
- `choose_layouts` + `relayout`: inference (eager decoding, `FastForward.logits`) multiplies by weights
  laid out the way that is fastest on this machine for its number of rows: row-major (the reference),
  column-major, or oneDNN's blocked layout. Which wins depends on the CPU (oneDNN's streams 1.5-2.5x faster
  than row-major at batch 1 on an AMD EPYC and 30% slower on an Intel Xeon), so `tuning.fastest` times them
  on the real shapes once and remembers (per process; on disk when timing took over a second).

Where a model computes something these paths do not (attention dropout in training mode), they refuse with
a ValueError; `unsupported(model)` says why, and the trainer's `fast_step_unsupported` asks it.

The pieces these paths are built from are public too, for benchmarks and tests that run one of them:
`linear` (a matmul in any of the layouts), `rms_norm`, `elementwise_rope`, `causal_attention`, `decoder_layer`
(one layer, its RoPE and attention passed in) and `forward_cached` (eager prefill or decode over a
`StaticKVCache`).

Mixed precision here means what `torch.autocast` means for this model: matmuls and attention in the
low-precision dtype, norms, RoPE and the residual stream in float32, loss in float32.
"""

from __future__ import annotations

from .decode import FastGenerator, StaticKVCache, decode_step, fast_generate, forward_cached, rope_matrices
from .forward import FastForward, causal_attention, decoder_layer, elementwise_rope, rms_norm, rope_table, unsupported
from .forward import _SwiGLUDown as _SwiGLUDown  # for the tests
from .loss import IGNORE_INDEX, Workspace, chunked_cross_entropy, linear_cross_entropy
from .packing import LAYOUTS, PackCache, PackedLayer, PackedWeights, choose_layouts, linear, pack_weights, relayout, to_layout

__all__ = [
    "IGNORE_INDEX",
    "LAYOUTS",
    "FastForward",
    "FastGenerator",
    "PackCache",
    "PackedLayer",
    "PackedWeights",
    "StaticKVCache",
    "Workspace",
    "causal_attention",
    "choose_layouts",
    "chunked_cross_entropy",
    "decode_step",
    "decoder_layer",
    "elementwise_rope",
    "fast_generate",
    "forward_cached",
    "linear",
    "linear_cross_entropy",
    "pack_weights",
    "relayout",
    "rms_norm",
    "rope_matrices",
    "rope_table",
    "to_layout",
    "unsupported",
]
