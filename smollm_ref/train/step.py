"""One optimizer step, and the choice of how it is computed: the fast training forward or the reference model.

    fast_forward(model, cfg.model, world_size, precision, objective_reason)   the fast step's forward, or why not
    train_step(model, micro_batches, optimizer, scaler, lr=..., grad_clip=...) -> StepStats

What the step's loss is (text, chat) is the objective's (`smollm_ref.train.objectives`); the optimizer and
the learning-rate schedule are `smollm_ref.train.optim`'s.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from .. import lora
from .objectives.text import lm_loss
from .options import ModelOptions

__all__ = ["StepStats", "fast_forward", "fast_step_unsupported", "train_step"]


def fast_step_unsupported(
    model, options: ModelOptions, world_size: int, precision: str, objective: str | None = None
) -> str | None:
    """Why this run's step does not use the fast training forward (`smollm_ref.fast.FastForward`), as a phrase
    for the log, or None where it does. The one place that choice is made.

    It reads the model's Parameters directly, so it cannot go through a DDP or FSDP wrapper (their gradient
    hooks would not fire): multi-process runs keep the reference model. Mixed precision only: there packing
    replaces autocast's per-op weight casts; in float32 it has no casts to save and its per-step weight
    concatenation made a 4x128 CPU step ~9% slower than the reference's. Not with LoRA adapters (peft's layers
    around the linears, `smollm_ref.lora`), which its packed weights would skip. And only where it computes the
    reference's training function for this model (`smollm_ref.fast.unsupported`: no attention dropout), for
    an objective it can train (`objective`: the objective's `fast_step_unsupported`, None where it can)."""
    if not options.fast:
        return "--no-fast"
    if precision == "fp32":
        return "fp32: the fast step only pays in mixed precision"
    if world_size > 1 or options.fsdp:
        return "several processes or FSDP: the fast step reads the Parameters past the wrapper's gradient hooks"
    if lora.adapted(model):
        return "LoRA: the fast step packs the linears' own weights and would leave out peft's adapters"
    if objective is not None:
        return objective
    from ..fast import unsupported

    return unsupported(model, training=True)


def fast_forward(model, options: ModelOptions, world_size: int, precision: str, objective: str | None = None):
    """(the fast training forward, None) where `fast_step_unsupported` finds nothing against it, else (None,
    its reason). Compute dtype follows --precision (autocast-style: bf16/fp16 matmuls, float32 norms,
    residual and loss)."""
    reason = fast_step_unsupported(model, options, world_size, precision, objective)
    if reason is not None:
        return None, reason
    from ..fast import FastForward

    return FastForward(model, torch.bfloat16 if precision == "bf16-mixed" else torch.float16, compile=options.compile), None


@dataclass(frozen=True)
class StepStats:
    loss: torch.Tensor  # mean over micro-batches on this rank (0-dim, detached)
    grad_norm: float  # before clipping
    skipped: bool  # gradients were not finite: no update was made


def _ddp_of(model):
    inner = getattr(model, "_orig_mod", model)  # through torch.compile
    return inner if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else None


def train_step(
    model,
    micro_batches,
    optimizer,
    scaler=None,
    *,
    lr: float | None = None,
    grad_clip: float = 1.0,
    autocast=None,
    loss_fn=None,
    divide_by: float | None = None,
) -> StepStats:
    """One optimizer step over `micro_batches` [(inputs, targets), ...] already on the model's device.

    loss_fn(*micro_batch): the micro-batch loss (default `lm_loss(model, ...)` under `autocast`); the
    trainer passes `FastForward(...).lm_loss`, which does its own mixed precision, or for chat data a sum.

    The step's loss is the sum over its trained tokens divided by their number in the whole step. Without
    `divide_by`, every micro-batch trains the same number of tokens (text windows), so each micro-batch's
    mean is divided by their number. With it, loss_fn returns a sum and each is divided by `divide_by`:
    the step's trained tokens over all micro-batches and ranks, divided by the number of ranks (DDP
    averages the ranks' gradients). DDP syncs only on the last micro-batch. With a GradScaler (fp16)
    gradients are unscaled before clipping. A step whose gradient norm is not finite is skipped (no
    update); with fp16 the scaler also lowers its scale. Raises ValueError for a non-finite or negative
    lr or grad_clip (NaN would turn clipping off)."""
    if not (math.isfinite(grad_clip) and grad_clip >= 0) or (lr is not None and not (math.isfinite(lr) and lr >= 0)):
        raise ValueError(f"train_step needs a finite grad_clip >= 0 and lr >= 0, got grad_clip {grad_clip}, lr {lr}")
    micro_batches = list(micro_batches)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    ddp = _ddp_of(model)
    denominator = divide_by if divide_by is not None else len(micro_batches)
    total = None
    for i, batch in enumerate(micro_batches):
        sync = ddp is None or i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else ddp.no_sync(), autocast or contextlib.nullcontext():
            loss = (loss_fn or functools.partial(lm_loss, model))(*batch) / denominator
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    norm = float(norm)
    finite = math.isfinite(norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the update itself when it found inf/nan while unscaling
        scaler.update()
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=total, grad_norm=norm, skipped=not finite)
