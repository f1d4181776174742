"""What a run tells people: the progress bar, console lines, metrics.jsonl and WandB. The main rank gets a
`RunLogger`; every other rank a `NullLogger` with the same methods, so the loop never asks which rank it is.
The format of metrics.jsonl, and reading it, belong to `smollm_ref.metrics_file`, which the plot uses without
importing the trainer."""

from __future__ import annotations

import netrc
import os
import secrets
import socket
import string
import sys
import warnings
from pathlib import Path

from .. import metrics_file
from ..console import say
from .evaluator import brief
from .options import LogOptions


class NullLogger:
    """A non-main rank's logger: says and records nothing."""

    wandb_run_id: str | None = None
    logged_mean: tuple[float, int] | None = None  # the last log line's (mean loss, steps it covers)

    def say(self, message: str) -> None:
        pass

    def start(self, step: int, max_steps: int) -> None:
        pass

    def step(self, step: int, values: dict, shown: tuple[str, ...] = ()) -> None:
        pass

    def validation(self, step: int, loss: float, figures: dict[str, float] | None = None, shown: tuple[str, ...] = ()) -> None:
        pass

    def sample(self, step: int, text: str, sampling=None) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger(NullLogger):
    """The main rank's logger. `step` records every step (metrics.jsonl, WandB, the bar) and prints a line
    every --log-every steps with the mean loss since the last line (one batch is noisy; a mean shows the trend)."""

    def __init__(self, run_dir: Path, options: LogOptions, resumed_step: int, wandb_run_id: str | None, run_options: dict):
        """`options`: the run's `cfg.log`; `run_options`: every option, flat (`TrainConfig.to_dict()`), which
        WandB records as the run's config."""
        self.options = options
        metrics_file.truncate_after(run_dir / metrics_file.NAME, resumed_step)  # a resumed run redoes later steps
        wandb_run = None
        self.wandb_run_id = wandb_run_id
        if options.wandb:
            wandb_run, self.wandb_run_id = _start_wandb(options.wandb_project, run_options, run_dir, wandb_run_id)
        self.log = MetricsLog(run_dir, wandb_run)
        self.bar = None
        self.recent: list[float] = []

    def say(self, message: str) -> None:
        say(message)

    def start(self, step: int, max_steps: int) -> None:
        from tqdm.auto import tqdm

        self.max_steps = max_steps
        self.bar = tqdm(
            total=max_steps,
            initial=step,
            desc="training",
            unit="step",
            dynamic_ncols=True,
            disable=not self.options.progress,
            file=sys.stderr,
        )

    def step(self, step: int, values: dict, shown: tuple[str, ...] = ()) -> None:
        """Record a step; every --log-every steps a line with the mean loss, and the objective's `shown` figures
        of this step (e.g. rewards/margins)."""
        self.log.log(step, values)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_sec']:,.0f}", refresh=False)
        self.recent.append(values["loss"])
        if step % self.options.log_every == 0 or step == self.max_steps:
            mean, count = sum(self.recent) / len(self.recent), len(self.recent)
            self.recent.clear()
            self.logged_mean = (mean, count)
            mfu = f" | mfu {values['mfu']:.1%}" if "mfu" in values else ""
            say(
                f"step {step:>6} | loss {mean:.4f} (mean of {count}) | lr {values['lr']:.2e} | grad norm {values['grad_norm']:.3f}"
                f" | {values['tokens_per_sec']:,.0f} tok/s (avg {values['avg_tokens_per_sec']:,.0f}){mfu}"
                + _figures(values, shown)
            )

    def validation(self, step: int, loss: float, figures: dict[str, float] | None = None, shown: tuple[str, ...] = ()) -> None:
        """Record the validation loss and the other figures (the objective's on the held-out rows, the benchmarks'
        of `evaluator.Evaluator`) in one record; the line shows the loss, the `shown` ones and the benchmarks'."""
        self.log.log(step, {"val_loss": loss, **(figures or {})})
        benchmarks = brief(figures or {})
        say(f"step {step:>6} | val loss {loss:.4f}" + _figures(figures or {}, shown) + (f" | {benchmarks}" if benchmarks else ""))

    def sample(self, step: int, text: str, sampling=None) -> None:
        """Print and record a sample, and how it was drawn (`samples.Sampling`: temperature, top-k, seed)."""
        how = f" ({sampling.describe()})" if sampling is not None else ""
        say(f"--- sample at step {step}{how} ---\n{text}\n---")
        self.log.log(step, {"sample": text, **(sampling.record() if sampling is not None else {})})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.log is not None:
            self.log.close()
            self.log = None


class MetricsLog:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl (`metrics_file.encode`) and mirrors it to
    WandB when enabled. Only the main rank creates one."""

    def __init__(self, run_dir: Path, wandb_run=None):
        self.path = Path(run_dir) / metrics_file.NAME
        self.file = open(self.path, "a", encoding="utf-8")
        self.wandb_run = wandb_run

    def log(self, step: int, values: dict) -> None:
        self.file.write(metrics_file.encode(step, values))
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def wandb_mode() -> str:
    """Decided before wandb.init, so that init never waits on a network it cannot reach: WANDB_MODE if
    set; else offline without an API key (environment or ~/.netrc); else online only if the server answers."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return "offline"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


def _start_wandb(project: str, config: dict, run_dir: Path, run_id: str | None):
    """A WandB run continuing `run_id` when resuming. The mode is chosen first (offline without a key or a
    network), so init never blocks; if init still fails the job goes on without WandB."""
    import wandb  # present: the run's inputs were checked for it (run._read_inputs)

    # WandB's own id format (8 lowercase alphanumerics), drawn from `secrets` so the training RNG is untouched
    run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    try:
        run = wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            mode=wandb_mode(),
            dir=str(run_dir),
            config=config,
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
    except Exception as e:  # never let logging kill a training run
        warnings.warn(f"wandb.init failed ({type(e).__name__}: {e}); logging to metrics.jsonl only", stacklevel=2)
        return None, run_id
    return run, run_id


def _figures(values: dict, shown: tuple[str, ...]) -> str:
    """' | rewards/accuracies 0.750 rewards/margins 0.012' for the `shown` keys `values` holds ('' for none)."""
    said = [f"{k} {values[k]:.4g}" for k in shown if k in values]
    return f" | {' '.join(said)}" if said else ""
