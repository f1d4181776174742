"""The trainer: train SmolLM2 from scratch or fine-tune it, with exact resume, checkpoints transformers can
load, metrics, samples, and DDP/FSDP2 under torchrun.

    python -m smollm_ref.train --recipe quickstart                 # a few minutes on a laptop CPU
    python -m smollm_ref.train --recipe original                   # SmolLM2-135M from scratch, 5000 steps
    python -m smollm_ref.train --resume runs/original --additional-steps 50
    torchrun --nproc_per_node 2 -m smollm_ref.train --recipe ... [--fsdp]

One job per module, in the order data flows:
    options       TrainConfig: eight sections of options, one per component that reads them (model, data, optim,
                  checkpoint, log, eval, preference, lora), every option with its help; the command line generated
                  from them, recipes, what a resume inherits
    objectives    what a run optimises, chosen once from the data: text (next-token loss), chat (SFT) or
                  preference (DPO); each with its data, loss, validation and samples
    optim         the AdamW policy, the learning-rate schedule
    step          train_step: one optimizer step; the fast training forward or the reference model
    step_metrics  step time, tokens/s, MFU and epoch: computed in one place
    samples       how the trainer's samples are drawn (temperature, top-k, their own seed)
    state         RunState: step, tokens, data position, schedule horizon, WandB id (RNG with it in checkpoints)
    checkpointer  when to save, what a checkpoint holds, restoring a run, keep-last and optimizer-state policy
    logger        progress bar, console, metrics.jsonl, WandB on the main rank; a NullLogger elsewhere
    evaluator     the --eval-tasks benchmarks, read once, scored at each validation (eval/TASK/acc_norm_nospace)
    inputs        run directory, model config and weights, tokenizer: checked before writing
    run           Run: everything above put together, and the loop's verbs
    loop          train() and the loop itself: step, log, maybe validate, maybe checkpoint or sample, stop
    cli           main(): recipe + command line, one-line errors, exit codes
"""

from ..distributed import resolve_device
from ..precision import autocast_context, resolve_precision
from .checkpointer import Checkpointer
from .cli import main
from .loop import TrainResult, continue_training, fit, train
from .objectives import ChatObjective, Objective, PreferenceObjective, TextObjective, lm_loss
from .objectives.text import evaluate, sample_text
from .optim import adamw, lr_at, make_optimizer
from .options import (
    CheckpointOptions,
    DataOptions,
    EvalOptions,
    LogOptions,
    LoraOptions,
    ModelOptions,
    OptimOptions,
    PreferenceOptions,
    TrainConfig,
    TrainError,
    build_parser,
    read_recipe,
    resolve_config,
)
from .run import Diverged, Run
from .state import RunState
from .step import StepStats, train_step

__all__ = [
    "ChatObjective",
    "CheckpointOptions",
    "Checkpointer",
    "DataOptions",
    "Diverged",
    "EvalOptions",
    "LogOptions",
    "LoraOptions",
    "ModelOptions",
    "OptimOptions",
    "PreferenceObjective",
    "PreferenceOptions",
    "Run",
    "RunState",
    "StepStats",
    "TrainConfig",
    "TrainError",
    "TextObjective",
    "TrainResult",
    "adamw",
    "autocast_context",
    "build_parser",
    "continue_training",
    "evaluate",
    "fit",
    "lm_loss",
    "lr_at",
    "main",
    "make_optimizer",
    "Objective",
    "read_recipe",
    "resolve_config",
    "resolve_device",
    "resolve_precision",
    "sample_text",
    "train",
    "train_step",
]
