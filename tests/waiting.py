"""Waiting for a child process to reach a point, without sleeping a guessed time: poll what it writes, and
fail (never carry on) when it exits first or the wait outlasts a bound far above any normal run."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

BOUND_S = 600.0  # only a hang reaches it; a slow machine does not change what is asserted


def wait_until(condition: Callable[[], object], what: str, proc: subprocess.Popen | None = None, bound_s: float = BOUND_S):
    """`condition()` once it is truthy. AssertionError (the child killed) when `proc` exits before, or after
    `bound_s` seconds."""
    deadline = time.monotonic() + bound_s
    while not (result := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
                proc.wait()
            raise AssertionError(f"no {what} after {bound_s:.0f} s")
        time.sleep(0.02)
    return result


def logged_steps(run_dir: Path) -> list[int]:
    """The steps with a loss in RUN/metrics.jsonl, from whole lines only (the trainer may be mid-line)."""
    try:
        text = (Path(run_dir) / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    rows = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
    return [r["step"] for r in rows if "loss" in r]
