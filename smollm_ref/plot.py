"""Curves of a training run: `python -m smollm_ref.plot RUN_DIR` draws loss (and validation loss), learning
rate and tokens/sec from RUN_DIR/metrics.jsonl into RUN_DIR/metrics.png, and, for a run with --eval-tasks, the
benchmarks' accuracy at each validation (eval/TASK/acc_norm_nospace solid, eval/TASK/acc dashed), and, for a
preference (DPO) run, its rewards (TRL's rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from . import metrics_file
from .arguments import ArgumentParser
from .storage import BadFile, is_number, read_small_json, shown

# a skipped step (its gradient not finite) logs its loss as NaN or Infinity: drawn as a gap; the trainer
# never logs a non-finite learning rate or rate, so one there is a damaged file
MAY_BE_NONFINITE = ("loss", "val_loss")
TRAIN_KEYS = ("loss", "lr", "tokens_per_sec", "avg_tokens_per_sec")
EVAL_FIGURES = ("acc_norm_nospace", "acc")  # the trainer's eval/TASK/FIGURE keys (smollm_ref.train.evaluator)
# a preference run's step figures (smollm_ref.train.objectives.preference), and on held-out pairs with val_
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
# a preference run's loss, by its --loss-type: a mean over pairs, not a cross-entropy per token
PREFERENCE_LOSSES = {"sigmoid": "DPO loss (sigmoid)", "ipo": "IPO loss", "apo_zero": "APO-zero loss"}


def _value(path: Path, number: int, record: dict, key: str) -> float:
    """`record[key]` as a float (NaN for a non-finite loss: a gap); else ValueError naming the file, line and key."""
    fix = "fix or remove that line, then plot again"
    if key not in record:
        raise ValueError(f"{path} line {number} is a training step's record without {key!r}; {fix}")
    value = record[key]
    number_ = is_number(value)
    try:
        value = float(value) if number_ else None
    except OverflowError:  # a JSON integer of hundreds of digits
        value = None
    if value is None or (not math.isfinite(value) and key not in MAY_BE_NONFINITE):
        raise ValueError(f"{path} line {number}: {key!r} is {shown(record[key])}, not a finite number; {fix}")
    return value if math.isfinite(value) else math.nan


def _mean_of_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def eval_series(path: Path, records: list[tuple[int, dict]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{task: {figure: [(step, fraction), ...]}} from the eval/TASK/FIGURE keys of `records` (line number,
    record), in file order; a task scored at some validations only (a resume that changed --eval-tasks) has
    points there only. A value that is not a number in [0, 1] is a ValueError naming the file, line and key."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for number, record in records:
        for key in record:
            prefix, _, rest = key.partition("/")
            task, _, figure = rest.rpartition("/")
            if prefix != "eval" or not task or figure not in EVAL_FIGURES:
                continue
            value = record[key]
            if not is_number(value) or not 0 <= value <= 1:
                raise ValueError(
                    f"{path} line {number}: {key!r} is {shown(value)}, not a fraction from 0 to 1; fix or remove that line, then plot again"
                )
            series.setdefault(task, {}).setdefault(figure, []).append((record["step"], float(value)))
    return series


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the figure and return its path. Raises FileNotFoundError, or a ValueError naming the file and line
    (`metrics_file.read_records`; and a plotted value, see `_value` and `eval_series`) with a readable message. A
    non-finite loss (a skipped step's) is drawn as a gap."""
    import matplotlib.pyplot as plt

    fig = figure(run_dir)
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def figure(run_dir: str | Path):
    """The run's matplotlib Figure: loss, learning rate, tokens/s, and the benchmarks' panel when there are figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / metrics_file.NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory written by python -m smollm_ref.train")
    records = metrics_file.read_numbered_metrics(path)  # every value is read before a figure is made
    train = [{"step": r["step"], **{k: _value(path, n, r, k) for k in TRAIN_KEYS}} for n, r in records if "loss" in r]
    val = [{"step": r["step"], "val_loss": _value(path, n, r, "val_loss")} for n, r in records if "val_loss" in r]
    evals = eval_series(path, records)
    rewards = {
        prefix: [
            {"step": r["step"], **{k: _value(path, n, r, prefix + k) for k in REWARD_KEYS}}
            for n, r in records
            if prefix + REWARD_KEYS[0] in r
        ]
        for prefix in ("", "val_")
    }
    if not train and not val:
        raise ValueError(f"{path} holds no loss records yet; plot again once the run has taken a step")
    rows = 3 + bool(evals) + bool(rewards[""] or rewards["val_"])
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3 * rows), sharex=True)
    ax_loss, ax_lr, ax_tps = axes[:3]
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], lw=0.8, alpha=0.5, label="train loss")
        window = min(max(5, len(train) // 50), max(1, len(train) // 4))  # a running mean shows the trend through the noise
        smooth = [_mean_of_finite([r["loss"] for r in train[max(0, i - window + 1) : i + 1]]) for i in range(len(train))]
        ax_loss.plot(steps, smooth, lw=1.5, label=f"train loss (mean of {window})")
        ax_lr.plot(steps, [r["lr"] for r in train], color="tab:purple")
        ax_tps.plot(steps, [r["tokens_per_sec"] for r in train], lw=0.8, alpha=0.5, label="tokens/s")
        ax_tps.plot(steps, [r["avg_tokens_per_sec"] for r in train], lw=1.5, label="average tokens/s")
        ax_tps.legend()
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax_loss.set_ylabel(_loss_label(run_dir) if rewards[""] or rewards["val_"] else "cross-entropy (nats/token)")
    ax_loss.legend()
    ax_lr.set_ylabel("learning rate")
    ax_tps.set_ylabel("tokens / second")
    if evals:
        _draw_evals(axes[3], evals)
    if rewards[""] or rewards["val_"]:
        _draw_rewards(axes[-1], rewards)
    axes[-1].set_xlabel("optimizer step")
    ax_loss.set_title(f"training run {run_dir.resolve().name}")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _loss_label(run_dir: Path) -> str:
    """A preference run's loss axis: its --loss-type as the run's train_config.json records it (a damaged or
    missing file: the kind alone)."""
    try:
        loss_type = read_small_json(run_dir / "train_config.json", "run options").get("loss_type")
    except (OSError, BadFile, AttributeError):
        loss_type = None
    return f"{PREFERENCE_LOSSES.get(loss_type, 'preference loss')}, mean over pairs"


def _draw_evals(ax, evals: dict[str, dict[str, list[tuple[int, float]]]]) -> None:
    """One colour per task: acc_norm_nospace (the model card's figure) solid, acc dashed, in percent."""
    for i, (task, figures) in enumerate(evals.items()):
        colour = f"C{i % 10}"
        for figure_name, style in zip(EVAL_FIGURES, ("o-", "x--")):
            points = figures.get(figure_name, [])
            if points:
                label = task if figure_name == "acc_norm_nospace" else f"{task} (acc)"
                ax.plot([s for s, _ in points], [100 * v for _, v in points], style, color=colour, lw=1.2, ms=4, label=label)
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.legend(fontsize="small", ncol=2)


def _draw_rewards(ax, rewards: dict[str, list[dict]]) -> None:
    """A preference run's rewards (beta x log-ratio to the reference; TRL's names): chosen, rejected and their margin
    at each step (lines) and on the held-out pairs (points); the share of pairs ranked right on a second axis."""
    for prefix, style, width in (("", "-", 1.0), ("val_", "o--", 1.2)):
        points = rewards[prefix]
        if not points:
            continue
        steps = [r["step"] for r in points]
        where = "held out" if prefix else "train"
        for i, key in enumerate(REWARD_KEYS[:3]):
            ax.plot(steps, [r[key] for r in points], style, color=f"C{i}", lw=width, ms=4, label=f"{key} ({where})")
    ax.set_ylabel("reward (beta x log-ratio)")
    ax.legend(fontsize="small", ncol=2)
    share = ax.twinx()
    for prefix, style in (("", ":"), ("val_", "s:")):
        points = rewards[prefix]
        if points:
            share.plot([r["step"] for r in points], [100 * r["rewards/accuracies"] for r in points], style, color="C3", ms=4)
    share.set_ylabel("rewards/accuracies (%), dotted", color="C3")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m smollm_ref.plot",
        description="Plot a training run's loss, validation loss, learning rate, tokens/sec, with --eval-tasks "
        "its benchmarks' accuracy, and for a preference (DPO) run its rewards.",
    )
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except (OSError, ValueError) as e:  # BadFile is a ValueError; OSError: unreadable file, figure not written
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
