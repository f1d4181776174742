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

import numpy as np
import torch
import torch.nn.functional as F

from .. import data
from ..model import causal_lm_loss_sum
from ..precision import autocast_context
from .options import TrainConfig, TrainError

__all__ = [
    "Sampling",
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
    "check_schedule",
    "sample_chat",
    "sample_seed",
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
        if device.index >= torch.cuda.device_count():
            raise TrainError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); pass cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
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


def check_schedule(cfg: TrainConfig, horizon: int) -> None:
    """Raise TrainError when a decaying schedule (cosine, wsd) would never decay: its learning rate at the
    last step of the horizon is still the peak (a warm-up as long as the horizon, or a wsd decay share
    shorter than two steps), and any schedule whose warm-up outlasts the horizon, so that the learning rate
    never reaches --lr."""
    if cfg.lr_schedule == "constant" or cfg.min_lr_ratio == 1:
        if cfg.warmup_steps > horizon:  # warm-up step i runs at lr * (i + 1) / warmup_steps
            raise TrainError(
                f"--warmup-steps {cfg.warmup_steps} outlasts the run's {horizon} steps: the learning rate never reaches "
                f"--lr {cfg.lr:g}; pass fewer --warmup-steps or more --max-steps"
            )
        return
    if cfg.warmup_steps >= horizon - 1 or lr_at(horizon - 1, cfg, horizon) >= cfg.lr:
        source = "--lr-decay-steps" if cfg.lr_decay_steps else "--max-steps"
        raise TrainError(
            f"--lr-schedule {cfg.lr_schedule} never decays: its horizon of {horizon} steps ({source}) ends before a "
            f"step below the peak (--warmup-steps {cfg.warmup_steps}"
            + (f", --wsd-decay-fraction {cfg.wsd_decay_fraction:g}" if cfg.lr_schedule == "wsd" else "")
            + "); pass fewer --warmup-steps, a longer horizon, or --lr-schedule constant"
        )


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


@dataclass(frozen=True)
class Sampling:
    """How the trainer's samples are drawn: temperature (0: greedy), top-k (None: every token), and the seed of
    the sample's own generator, so the training RNG is untouched."""

    temperature: float = 0.8
    top_k: int | None = 50
    seed: int = 0

    def describe(self) -> str:
        if self.temperature == 0:
            return "greedy"
        return f"temperature {self.temperature:g}, top-k {self.top_k or 'off'}, seed {self.seed}"

    def record(self) -> dict:
        """The fields metrics.jsonl keeps beside a sample, named as the options that set them."""
        return {"sample_temperature": self.temperature, "sample_top_k": self.top_k or 0, "sample_seed": self.seed}


def sample_seed(seed: int, step: int) -> int:
    """The seed of the sample at `step` of a run seeded with `seed`: the same for the same (seed, step), in a
    resumed run too, and another at every step (a fixed seed would draw the same noise at every sample)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_prompt_text(prompt: str) -> str:
    """The text a sample continues: `prompt` without spaces or tabs at its end (a BPE tokenizer puts a
    word's space in front of the word, so a prompt ending in one is continued with a second)."""
    return prompt.rstrip(" \t")


def _sample(model, ids: torch.Tensor, max_new_tokens: int, autocast, sampling: Sampling, stop_id: int | None) -> list[int]:
    """The new tokens of a KV-cached sample continuing `ids`; the model is in eval mode meanwhile. Raises
    ValueError when prompt and max_new_tokens together exceed the model's positions."""
    from ..generate import generate

    was_training = model.training
    model.eval()
    g = torch.Generator(device=ids.device).manual_seed(sampling.seed)
    try:
        with autocast:
            out = generate(
                model, ids, max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k, eos_token_id=stop_id,
                generator=g,
            )  # fmt: skip
    finally:
        model.train(was_training)
    return out[0, ids.shape[1] :].tolist()


def text_prompt_ids(tokenizer, prompt: str, stop_id: int | None) -> torch.Tensor:
    """(1, T) ids of a text sample's prompt (`sample_prompt_text`); an empty one starts from `stop_id`."""
    ids = tokenizer(sample_prompt_text(prompt), add_special_tokens=False, return_tensors="pt").input_ids
    return ids if ids.shape[1] else torch.tensor([[stop_id or 0]])


def chat_prompt_ids(tokenizer, question: str) -> torch.Tensor:
    """(1, T) ids of a chat sample's prompt: the tokenizer's chat template with the generation prompt."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt")
    return ids["input_ids"] if hasattr(ids, "keys") else ids


def sample_text(
    model, tokenizer, prompt: str, max_new_tokens: int, device, autocast, sampling: Sampling | None = None,
    stop_id: int | None = None,
) -> str:  # fmt: skip
    """A sample continuing `prompt` (without its trailing spaces: `sample_prompt_text`), up to the document
    separator `stop_id`, drawn as `sampling` says (default temperature 0.8, top-k 50, seed 0)."""
    ids = text_prompt_ids(tokenizer, prompt, stop_id).to(device)
    new = _sample(model, ids, max_new_tokens, autocast, sampling or Sampling(), stop_id)
    return tokenizer.decode(new, skip_special_tokens=False)


def sample_chat(model, tokenizer, question: str, max_new_tokens: int, device, autocast, sampling: Sampling | None = None) -> str:
    """A chat reply to `question` (`chat_prompt_ids`), sampled as `sample_text` samples, up to the token that
    closes the assistant's turn."""
    ids = chat_prompt_ids(tokenizer, question).to(device)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    return tokenizer.decode(_sample(model, ids, max_new_tokens, autocast, sampling or Sampling(), end), skip_special_tokens=True)
