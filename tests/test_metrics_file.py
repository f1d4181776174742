"""A run's metrics.jsonl as `--resume` and `python -m smollm_ref.plot` read it: a regular file only (a FIFO
never hangs them, /dev/zero is never read), streamed line by line, each line a JSON object with an integer
step; anything else is one line naming the file (and the line), exit 2, nothing written to the run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import signal
from pathlib import Path

import pytest
from trainer_runs import argv, tiny_options

from smollm_ref import train
from smollm_ref.plot import main as plot_main

GOOD = '{"step": 1, "loss": 5.0, "lr": 0.001, "tokens_per_sec": 1.0, "avg_tokens_per_sec": 1.0}\n'


class Hung(BaseException):  # not an Exception: no `except` of the code under test may swallow it
    pass


@pytest.fixture
def watchdog():
    """A regression that blocks (a FIFO opened for reading) or reads without end (/dev/zero) fails the test
    instead of hanging it or eating the machine's memory: an alarm after 60 s, 2 GiB more address space."""

    def fire(signum, frame):
        raise Hung("still reading metrics.jsonl after 60 s")

    previous = signal.signal(signal.SIGALRM, fire)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(
        resource.RLIMIT_AS, (used + 2 * 2**30 if hard == resource.RLIM_INFINITY else min(hard, used + 2 * 2**30), hard)
    )
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    assert train.main(argv(tiny_options(tmp))) == 0
    return tmp / "run"


def make_fifo(path):
    os.mkfifo(path)


def make_dev_zero(path):
    path.symlink_to("/dev/zero")


def make_directory(path):
    path.mkdir()


def bad_line(text: bytes):
    def write(path):
        path.write_bytes(GOOD.encode() + text + b"\n" + GOOD.encode())  # the bad line is line 2, not the last

    return write


CASES = {
    "fifo": (make_fifo, "metrics.jsonl is not a regular file"),
    "dev-zero": (make_dev_zero, "metrics.jsonl is not a regular file"),
    "directory": (make_directory, "metrics.jsonl is not a regular file"),
    "array": (bad_line(b"[1,2]"), "metrics.jsonl line 2 is not a JSON object"),
    "string-step": (bad_line(b'{"step":"x"}'), 'metrics.jsonl line 2 is a record without an integer "step"'),
    "deep": (bad_line(b"[" * 100_000 + b"]" * 100_000), "metrics.jsonl line 2 nests JSON too deeply"),
    "not-utf8": (bad_line(b'{"step": 2, "loss": "\xff"}'), "metrics.jsonl line 2 is not UTF-8 text"),
}


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` with what it is: a file's digest, a link's target, "dir", or "other" (a FIFO)."""

    def kind(p: Path) -> str:
        if p.is_symlink():
            return "-> " + os.readlink(p)
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
        return "dir" if p.is_dir() else "other"

    return {str(p.relative_to(root)): kind(p) for p in sorted(root.rglob("*"))}


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_metrics_file_is_one_line_on_resume_and_plot(case, finished_run, tmp_path, capsys, watchdog):
    make, expected = CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.png").unlink(missing_ok=True)
    make(run / "metrics.jsonl")
    before = tree(run)
    assert train.main(["--resume", str(run), "--additional-steps", "1", "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err)
    assert expected in line and str(run) in line, line
    assert tree(run) == before  # nothing truncated, no step taken, no checkpoint written
    assert plot_main([str(run)]) == 2
    line = one_line(capsys.readouterr().err)
    assert expected in line and str(run) in line, line
    assert tree(run) == before  # no metrics.png


def plot_of(tmp_path: Path, second: str, capsys) -> tuple[int, str, Path]:
    """Plot a run whose metrics.jsonl has `second` as line 2 between good records: (exit status, stderr, run)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(GOOD + second + "\n" + GOOD.replace('"step": 1', '"step": 3'))
    status = plot_main([str(run)])
    return status, capsys.readouterr().err, run


def step(**values) -> str:
    """Line 2: a training step's record (as the trainer's logger writes it, json.dumps) with `values` changed."""
    return json.dumps({"step": 2, "loss": 5.0, "lr": 0.001, "tokens_per_sec": 1.0, "avg_tokens_per_sec": 1.0, **values})


BAD_VALUES = {
    "string-loss": (step(loss="5.0"), "'loss' is '5.0'"),
    "null-loss": (step(loss=None), "'loss' is None"),
    "list-loss": (step(loss=[5.0]), "'loss'"),
    "huge-int-loss": (step(loss=10**400), "'loss'"),
    "string-lr": (step(lr="0.1"), "'lr' is '0.1'"),
    "nan-lr": (step(lr=math.nan), "'lr' is nan"),
    "inf-rate": (step(tokens_per_sec=math.inf), "'tokens_per_sec'"),
    "bool-rate": (step(avg_tokens_per_sec=True), "'avg_tokens_per_sec'"),
    "no-lr": (json.dumps({"step": 2, "loss": 5.0, "tokens_per_sec": 1.0, "avg_tokens_per_sec": 1.0}), "without 'lr'"),
    "dict-val-loss": (json.dumps({"step": 2, "val_loss": {"a": 1}}), "'val_loss'"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_a_plotted_value_of_the_wrong_type_is_one_line_naming_file_line_and_key(case, tmp_path, capsys):
    """Once a matplotlib traceback (or a KeyError); now exit 2, one line, no figure written."""
    second, expected = BAD_VALUES[case]
    status, err, run = plot_of(tmp_path, second, capsys)
    assert status == 2, err[-2000:]
    line = one_line(err)
    assert f"{run / 'metrics.jsonl'} line 2" in line and expected in line, line
    assert not (run / "metrics.png").exists()


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_skipped_steps_non_finite_loss_is_drawn_as_a_gap(loss, tmp_path, capsys):
    """The trainer logs a skipped step's loss as it was (json.dumps writes NaN, Infinity): the plot is drawn."""
    lines = step(loss=loss, skipped=True) + "\n" + json.dumps({"step": 2, "val_loss": loss})
    status, err, run = plot_of(tmp_path, lines, capsys)
    assert status == 0, err[-2000:]
    assert (run / "metrics.png").stat().st_size > 0
