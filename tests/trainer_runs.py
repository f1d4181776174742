"""What the trainer's tests share: a tiny model with its own small tokenizer (tests/data/format1, steps in
milliseconds), the options and command line of a short run, and the losses a run logged."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FORMAT1 = Path(__file__).parent / "data" / "format1"


def tiny_options(tmp_path: Path, **changes) -> dict:
    """A 4-step run of the format1 model (vocab 320, 2 layers of width 32) on a copy of its corpus."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text((FORMAT1 / "corpus.txt").read_text())
    base = dict(
        model_config=str(FORMAT1 / "step_000002" / "config.json"),
        tokenizer=str(FORMAT1 / "step_000002"),
        data=str(corpus),
        out_dir=str(tmp_path / "run"),
        batch_size=2,
        seq_len=32,
        max_steps=4,
        checkpoint_every=2,
        eval_every=0,
        log_every=100,
        sample_tokens=4,
        progress=False,
    )
    base.update(changes)
    return base


def argv(opts: dict) -> list[str]:
    """The command line of `opts` (booleans as --flag / --no-flag; None left out)."""
    out = []
    for key, value in opts.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        out += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }


def wandb_written() -> None:
    """Wait until WandB has written its offline files. `run.finish()` can return before wandb-core has flushed
    the run's `.wandb` transaction log (seen with wandb 0.31.0: 1 run in ~15 had only the 7-byte header right
    after finish); `wandb.teardown()` stops the service process and waits for it, so the log is complete."""
    import wandb

    wandb.teardown()


class GradientCapture(torch.optim.Optimizer):
    """An optimizer that only records the gradients it is given (`grads`, in parameter order)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def one_line_error(capsys) -> str:
    """The one line a refused command printed on stderr (`error: ...`), asserting there is one and no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    return lines[0]


def tree(root: Path) -> dict[str, int]:
    """Every file of a run directory with its modification time, but the lock, which a refused trainer takes too."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.name != ".lock"}
