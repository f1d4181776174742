"""The pieces of a training step that the loop, the benchmark and the tests share: device and precision
choice, the AdamW policy, the learning-rate schedule, the loss, one optimizer step, validation, a sample.

    make_optimizer(model, cfg)      AdamW, no weight decay on norms and embeddings, fused where the device has it
    lr_at(step, cfg, horizon)       warmup, then constant / cosine / warmup-stable-decay
    train_step(model, micro_batches, optimizer, scaler, lr=..., grad_clip=...) -> StepStats
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import data
from ..model import causal_lm_loss_sum
from ..precision import autocast_context
from .options import TrainConfig, TrainError

__all__ = [
    "StepStats",
    "adamw",
    "autocast_context",
    "evaluate",
    "evaluate_chat",
    "fast_forward",
    "fast_step_unsupported",
    "lm_loss",
    "lr_at",
    "make_optimizer",
    "resolve_device",
    "resolve_precision",
    "sample_chat",
    "sample_text",
    "sft_loss_sum",
    "train_step",
    "trained_tokens",
]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda was asked but no CUDA device is available; use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainError("--device mps was asked but MPS is not available; use --device cpu or auto")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16-mixed" and device.type != "cuda":
        raise TrainError(f"--precision fp16-mixed needs a CUDA device (GradScaler), not {device.type}; use bf16-mixed or fp32")
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainError("this GPU has no bfloat16 support; use --precision fp16-mixed or fp32")
    return precision


def fast_step_unsupported(model, cfg: TrainConfig, world_size: int, precision: str, chat: bool = False) -> str | None:
    """Why this run's step does not use the fast training forward (`smollm_ref.fast.FastForward`), as a phrase
    for the log, or None where it does. The one place that choice is made.

    It reads the model's Parameters directly, so it cannot go through a DDP or FSDP wrapper (their gradient
    hooks would not fire): multi-process runs keep the reference model. Mixed precision only: there packing
    replaces autocast's per-op weight casts; in float32 it has no casts to save and its per-step weight
    concatenation made a 4x128 CPU step ~9% slower than the reference's. And only where it computes the
    reference's training function for this model (`smollm_ref.fast.unsupported`: no attention dropout)."""
    if not cfg.fast:
        return "--no-fast"
    if precision == "fp32":
        return "fp32: the fast step only pays in mixed precision"
    if world_size > 1 or cfg.fsdp:
        return "several processes or FSDP: the fast step reads the Parameters past the wrapper's gradient hooks"
    if chat:
        return "the fast step does not take chat rows yet"
    from ..fast import unsupported

    return unsupported(model, training=True)


def fast_forward(model, cfg: TrainConfig, world_size: int, precision: str, chat: bool = False):
    """(the fast training forward, None) where `fast_step_unsupported` finds nothing against it, else (None,
    its reason). Compute dtype follows --precision (autocast-style: bf16/fp16 matmuls, float32 norms,
    residual and loss)."""
    reason = fast_step_unsupported(model, cfg, world_size, precision, chat)
    if reason is not None:
        return None, reason
    from ..fast import FastForward

    return FastForward(model, torch.bfloat16 if precision == "bf16-mixed" else torch.float16, compile=cfg.compile), None


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices, none on norms, biases and the embedding (which is
    also the tied lm_head)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied weight is yielded once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), sharded=cfg.fsdp)


def lr_at(step: int, cfg: TrainConfig, horizon: int | None = None) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup over warmup_steps, then constant,
    cosine to min_lr_ratio * lr at `horizon`, or warmup-stable-decay (constant, then a linear decay over
    the last wsd_decay_fraction of the horizon). Past the horizon it stays at its final value."""
    horizon = horizon or cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = horizon - int(cfg.wsd_decay_fraction * horizon)
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, horizon - decay_start))
    return cfg.lr + (floor - cfg.lr) * progress


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; `targets` are the inputs shifted by one, so every position predicts.
    Logits upcast to float32 before the softmax, as transformers' loss does."""
    logits = model(inputs).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


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
    update); with fp16 the scaler also lowers its scale."""
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


def sft_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The summed next-token loss over the trained (label != -100) tokens of a chat batch; packed rows pass
    their restarting `position_ids` (and no attention mask), so no conversation attends to another."""
    logits = model(input_ids, position_ids=position_ids).logits
    return causal_lm_loss_sum(logits, labels)[0]


def trained_tokens(micro_batches) -> torch.Tensor:
    """How many tokens a chat step trains on (labels shifted by one, as the loss reads them)."""
    return sum((labels[:, 1:] != -100).sum() for _, labels, _ in micro_batches)


@torch.no_grad()
def evaluate(model, windows: data.Windows, batches: list[list[int]], device, autocast) -> torch.Tensor:
    """Mean loss over the given batches of validation windows (this rank's share)."""
    was_training = model.training
    model.eval()
    losses = []
    for indices in batches:
        inputs, targets = (t.to(device) for t in windows.batch(indices))
        with autocast:
            losses.append(lm_loss(model, inputs, targets))
    model.train(was_training)
    return torch.stack(losses).mean()


@torch.no_grad()
def evaluate_chat(model, rows, batches: list[list[int]], device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, trained tokens) over the given batches of validation rows (this rank's share): the
    assistant-only validation loss is their ratio over all ranks."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for indices in batches:
        input_ids, labels, position_ids = (t.to(device) if t is not None else None for t in rows.batch(indices))
        with autocast:
            total += sft_loss_sum(model, input_ids, labels, position_ids).float()
        count += (labels[:, 1:] != -100).sum()
    model.train(was_training)
    return total, count


def _sample(model, ids: torch.Tensor, max_new_tokens: int, autocast, seed: int, stop_id: int | None) -> list[int]:
    """The new tokens of a KV-cached sample (temperature 0.8, top-k 50) continuing `ids`, from its own
    generator, so the training RNG is untouched; the model is in eval mode meanwhile."""
    from ..generate import generate

    room = model.config.max_position_embeddings - ids.shape[1]
    was_training = model.training
    model.eval()
    g = torch.Generator(device=ids.device).manual_seed(seed)
    with autocast:
        out = generate(model, ids, min(max_new_tokens, room), temperature=0.8, top_k=50, eos_token_id=stop_id, generator=g)
    model.train(was_training)
    return out[0, ids.shape[1] :].tolist()


def sample_text(
    model, tokenizer, prompt: str, max_new_tokens: int, device, autocast, seed: int = 0, stop_id: int | None = None
) -> str:
    """A sample continuing `prompt` (see `_sample`), up to the document separator `stop_id`."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[stop_id or 0]], device=device)
    return tokenizer.decode(_sample(model, ids, max_new_tokens, autocast, seed, stop_id), skip_special_tokens=False)


def sample_chat(model, tokenizer, question: str, max_new_tokens: int, device, autocast, seed: int = 0) -> str:
    """A chat reply to `question`: the tokenizer's chat template with the generation prompt, sampled as
    `sample_text` samples, up to the token that closes the assistant's turn."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt")
    ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to(device)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    return tokenizer.decode(_sample(model, ids, max_new_tokens, autocast, seed, end), skip_special_tokens=True)
