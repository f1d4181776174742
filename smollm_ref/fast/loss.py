"""The fused lm_head + cross-entropy of the fast step: the loss without the (B, T, V) float32 logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import IGNORE_INDEX


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
