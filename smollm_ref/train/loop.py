"""The training loop: step, log, maybe validate, maybe checkpoint or sample, check for a stop. Each of
those is a verb of `Run` (smollm_ref/train/run.py); the loop decides only when."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from .. import distributed, metrics_file
from .options import TrainConfig, TrainError, read_recipe, resolve_config
from .run import Run


@dataclass
class TrainResult:
    step: int
    loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    run_dir: Path
    stopped_by_signal: int | None = None
    # the last log line's mean train loss and how many steps it covers (`loss` is the last finite step's alone)
    logged_loss: tuple[float, int] | None = None
    chat: bool = False  # a chat model (its objective's `chat_template`): `generate --chat` talks to it


class StopFlag:
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


def train(cfg: TrainConfig, resume_dir: Path | None = None) -> TrainResult:
    """Run `cfg` to its max_steps (or until SIGINT/SIGTERM)."""
    try:
        device = distributed.resolve_device(cfg.model.device, int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise TrainError(str(e)) from None
    d = distributed.init(device.type)
    try:
        return fit(Run.build(cfg, resume_dir, d, device))
    finally:
        distributed.shutdown(d)


def fit(run: Run) -> TrainResult:
    cfg, state = run.cfg, run.state
    result = TrainResult(state.step, None, None, None, run.run_dir)
    stop = StopFlag()
    try:
        with stop:
            if cfg.eval.eval_every and run.resumed_from is None:
                run.validate()  # where a fine-tune starts from
            if stop.signum is not None and run.resumed_from is None:  # interrupted before the first step
                result.stopped_by_signal = stop.signum
                run.logger.say(f"stopped by {signal.Signals(stop.signum).name} before the first step; {run.discard()}")
                return result
            if run.objective.sample_at_start and run.resumed_from is None:
                run.sample()  # a reply before fine-tuning, to compare with the ones after
            run.logger.start(state.step, run.max_steps)
            while state.step < run.max_steps:
                run.record(run.step())
                last = state.step == run.max_steps
                if cfg.eval.eval_every and (state.step % cfg.eval.eval_every == 0 or last):
                    run.validate()
                interrupted = distributed.any_rank(run.d, stop.signum is not None, run.device)
                if run.checkpointer.due(state.step, run.max_steps) or interrupted:
                    run.save()
                    if not interrupted:
                        run.sample()
                elif cfg.log.sample_every and state.step % cfg.log.sample_every == 0:
                    run.sample()
                if interrupted:
                    break
    finally:
        run.close()
    result = TrainResult(
        state.step, run.last_loss, run.last_val, run.checkpointer.last, run.run_dir, chat=run.objective.chat_template
    )
    result.logged_loss = run.logger.logged_mean
    if stop.signum is not None and state.step < run.max_steps:
        result.stopped_by_signal = stop.signum
        run.logger.say(
            f"stopped by {signal.Signals(stop.signum).name} at step {state.step}; checkpoint written. "
            f"Continue with: --resume {result.checkpoint or 'auto'}"
        )
    else:
        run.logger.say(closing_lines(result))
    return result


def closing_lines(result: TrainResult) -> str:
    """What a finished run says last: where its outputs are, how it ended, what to run next."""
    run_dir = result.run_dir
    if result.loss is None:
        losses = "no finite train loss"
    elif result.logged_loss is not None and result.logged_loss[1] > 1:
        mean, count = result.logged_loss
        losses = f"train loss {mean:.4f} (mean of the last {count} steps, as logged), last step's {result.loss:.4f}"
    else:
        losses = f"train loss {result.loss:.4f} (last step)"
    if result.val_loss is not None:
        losses += f", val loss {result.val_loss:.4f}"
    ask = "--chat --prompt 'What does the Python module json do?'" if result.chat else "--prompt 'Once upon a time'"
    return (
        f"done: {result.step} steps, {losses}\n"
        f"  checkpoints  {run_dir / 'checkpoints'} (newest {result.checkpoint.name if result.checkpoint else 'none'})\n"
        f"  metrics      {run_dir / metrics_file.NAME}\n"
        f"  next         python -m smollm_ref.plot {run_dir}\n"
        f"               python -m smollm_ref.generate --model {run_dir} {ask}\n"
        f"               python -m smollm_ref.demo --checkpoint {run_dir}\n"
        f"               python -m smollm_ref.train --resume {run_dir} --additional-steps N"
    )


def continue_training(checkpoint_path, config_path=None, additional_steps: int = 50) -> TrainResult:
    """Resume the run of `checkpoint_path` (a checkpoint or run directory) for `additional_steps` more steps.
    `config_path` is an optional recipe whose options override the checkpoint's run."""
    options = read_recipe(config_path) if config_path else {}
    options.update(resume=str(checkpoint_path), additional_steps=additional_steps)
    cfg, found = resolve_config(options)
    return train(cfg, found)
