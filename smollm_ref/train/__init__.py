"""The trainer: train SmolLM2 from scratch or fine-tune it, with exact resume, checkpoints transformers can
load, metrics, samples, and DDP/FSDP2 under torchrun.

    python -m smollm_ref.train --recipe quickstart                 # a few minutes on a laptop CPU
    python -m smollm_ref.train --recipe original                   # SmolLM2-135M from scratch, 5000 steps
    python -m smollm_ref.train --resume runs/original --additional-steps 50
    torchrun --nproc_per_node 2 -m smollm_ref.train --recipe ... [--fsdp]

One job per module, in the order data flows:
    options       TrainConfig (every option with its help), the command line, recipes, what a resume inherits
    step          device and precision, the AdamW policy, lr_at, lm_loss, train_step, evaluate, sample_text
    state         RunState: step, tokens, data position, schedule horizon, WandB id (RNG with it in checkpoints)
    checkpointer  when to save, what a checkpoint holds, restoring a run, keep-last and optimizer-state policy
    logger        progress bar, console, metrics.jsonl, WandB on the main rank; a NullLogger elsewhere
    evaluator     the --eval-tasks benchmarks, read once, scored at each validation (eval/TASK/acc_norm_nospace)
    inputs        run directory, model config and weights, tokenizer, token windows: checked before writing
    run           Run: everything above put together, and the loop's verbs
    loop          train() and the loop itself: step, log, maybe validate, maybe checkpoint or sample, stop
    cli           main(): recipe + command line, one-line errors, exit codes
"""

from .checkpointer import Checkpointer
from .cli import main
from .loop import TrainResult, continue_training, fit, train
from .options import TrainConfig, TrainError, build_parser, read_recipe, resolve_config
from .run import Diverged, Run
from .state import RunState
from .step import (
    StepStats,
    adamw,
    autocast_context,
    evaluate,
    lm_loss,
    lr_at,
    make_optimizer,
    resolve_device,
    resolve_precision,
    sample_text,
    train_step,
)

__all__ = [
    "Checkpointer",
    "Diverged",
    "Run",
    "RunState",
    "StepStats",
    "TrainConfig",
    "TrainError",
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
    "read_recipe",
    "resolve_config",
    "resolve_device",
    "resolve_precision",
    "sample_text",
    "train",
    "train_step",
]
