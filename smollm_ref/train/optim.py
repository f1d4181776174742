"""The optimizer and the learning-rate schedule of a run.

make_optimizer(model, optim)      AdamW, no weight decay on norms and embeddings, fused where the device has it
lr_at(step, optim, horizon)       warmup, then constant / cosine / warmup-stable-decay
check_schedule(optim, horizon)    refuse a schedule that would never decay, or never reach --lr
schedule_record(optim)            the schedule as a checkpoint records it

Each takes the run's `OptimOptions` (`cfg.optim`).
"""

from __future__ import annotations

import math

import torch

from .options import OptimOptions, TrainError


def adamw(param_groups, *, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, sharded: bool = False) -> torch.optim.AdamW:
    """`torch.optim.AdamW` with its fused kernel where this torch has one for the parameters' device, else
    the multi-tensor (foreach) one. FSDP2's sharded DTensor parameters take foreach."""
    param_groups = list(param_groups)
    params = [p for g in param_groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if not sharded and params:
        try:
            return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
            pass
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, foreach=True)


def make_optimizer(model: torch.nn.Module, optim: OptimOptions, sharded: bool = False) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices, none on norms, biases and the embedding (which is
    also the tied lm_head). `sharded`: the parameters are FSDP2's (--fsdp), which take the foreach kernel."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied weight is yielded once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), sharded=sharded)


def lr_at(step: int, optim: OptimOptions, horizon: int | None = None) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over warmup_steps, then constant,
    cosine to min_lr_ratio * lr at `horizon`, or warmup-stable-decay (constant, then a linear decay over
    the last wsd_decay_fraction of the horizon). Past the horizon it stays at its final value."""
    horizon = horizon or optim.lr_decay_steps or optim.max_steps
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "constant":
        return optim.lr
    floor = optim.lr * optim.min_lr_ratio
    if optim.lr_schedule == "cosine":
        progress = min(1.0, (step - optim.warmup_steps) / max(1, horizon - optim.warmup_steps))
        return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = horizon - int(optim.wsd_decay_fraction * horizon)
    if step < decay_start:
        return optim.lr
    progress = min(1.0, (step - decay_start) / max(1, horizon - decay_start))
    return optim.lr + (floor - optim.lr) * progress


def check_schedule(optim: OptimOptions, horizon: int) -> None:
    """Raise TrainError when a decaying schedule (cosine, wsd) would never decay: its learning rate at the
    last step of the horizon is still the peak (a warm-up as long as the horizon, or a wsd decay share
    shorter than two steps), and any schedule whose warm-up outlasts the horizon, so that the learning rate
    never reaches --lr."""
    if optim.lr_schedule == "constant" or optim.min_lr_ratio == 1:
        if optim.warmup_steps > horizon:  # warm-up step i runs at lr * (i + 1) / warmup_steps
            raise TrainError(
                f"--warmup-steps {optim.warmup_steps} outlasts the run's {horizon} steps: the learning rate never reaches "
                f"--lr {optim.lr:g}; pass fewer --warmup-steps or more --max-steps"
            )
        return
    if optim.warmup_steps >= horizon - 1 or lr_at(horizon - 1, optim, horizon) >= optim.lr:
        source = "--lr-decay-steps" if optim.lr_decay_steps else "--max-steps"
        raise TrainError(
            f"--lr-schedule {optim.lr_schedule} never decays: its horizon of {horizon} steps ({source}) ends before a "
            f"step below the peak (--warmup-steps {optim.warmup_steps}"
            + (f", --wsd-decay-fraction {optim.wsd_decay_fraction:g}" if optim.lr_schedule == "wsd" else "")
            + "); pass fewer --warmup-steps, a longer horizon, or --lr-schedule constant"
        )


def schedule_record(optim: OptimOptions) -> dict:
    """The schedule as a checkpoint's run state records it (the horizon is the run state's own)."""
    return {"kind": optim.lr_schedule, "lr": optim.lr, "warmup": optim.warmup_steps, "min_lr_ratio": optim.min_lr_ratio}
