"""Runs that nothing can hijack, hang or silently lose (issue 11, the trainer's part): the run directory is
the command line's, one trainer per run directory, a full disk is a sentence, a partial metrics line, an
interruption before the first step, and the temporaries of killed runs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_runs import argv
from trainer_runs import tiny_options as options
from waiting import wait_until

from smollm_ref import checkpoint, train
from smollm_ref.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err[-2000:]
    return lines[-1]


# 1. a checkpoint never decides where the trainer writes


def test_a_checkpoint_naming_another_directory_writes_nothing_there(tmp_path, capsys):
    victim = tmp_path / "victim"
    train.train(TrainConfig.from_options(**options(tmp_path / "v", out_dir=str(victim), keep_last=1)))
    (victim / "notes.txt").write_text("someone else's file")
    before = tree_digest(victim)
    # a run copied elsewhere (or handed over by someone else) whose train_config.json names the victim
    copy = tmp_path / "copy"
    shutil.copytree(victim, copy)
    assert json.loads((copy / "checkpoints" / "step_000004" / "train_config.json").read_text())["out_dir"] == str(victim)
    assert train.main(["--resume", str(copy), "--additional-steps", "2", "--keep-last", "1", "--no-progress"]) == 0
    assert tree_digest(victim) == before
    assert [p.name for _, p in checkpoint.list_checkpoints(copy / "checkpoints")] == ["step_000006"]
    # --out-dir wins over both; the resumed run writes only there
    other = tmp_path / "other"
    assert train.main(["--resume", str(copy), "--out-dir", str(other), "--additional-steps", "1", "--no-progress"]) == 0
    assert [p.name for _, p in checkpoint.list_checkpoints(other / "checkpoints")] == ["step_000007"]
    assert tree_digest(victim) == before


# 2. one trainer per run directory


def test_a_second_trainer_on_the_same_directory_is_refused_and_the_first_is_intact(tmp_path):
    opts = options(tmp_path, max_steps=100_000, checkpoint_every=5)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "smollm_ref.train", *argv(opts)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    run = Path(opts["out_dir"])
    wait_until(lambda: checkpoint.list_checkpoints(run / "checkpoints"), "first checkpoint", first)  # it holds the lock
    second = subprocess.run(
        [sys.executable, "-m", "smollm_ref.train", *argv({**opts, "overwrite": True})],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    resumer = subprocess.run(
        [sys.executable, "-m", "smollm_ref.train", "--resume", str(run), "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    for refused in (second, resumer):
        assert refused.returncode == 2
        assert f"is in use by another process (pid {first.pid})" in one_line_error(refused.stderr)
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # nothing truncated or interleaved by the refused runs
    newest = checkpoint.find(run)
    assert checkpoint.load_state(newest)["step"] == steps[-1]


def test_the_lock_dies_with_its_process(tmp_path):
    """A SIGKILLed trainer leaves its .lock file but not the lock: the next trainer resumes."""
    opts = options(tmp_path, max_steps=100_000, checkpoint_every=3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "smollm_ref.train", *argv(opts)], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL
    )
    run = Path(opts["out_dir"])
    wait_until(lambda: checkpoint.list_checkpoints(run / "checkpoints"), "first checkpoint", proc)
    proc.kill()
    proc.wait()
    assert (run / ".lock").exists()
    cfg, found = train.resolve_config({"resume": str(run), "additional_steps": 1, "progress": False})
    assert train.train(cfg, found).step == checkpoint.load_state(found)["step"] + 1


# 5. a full disk


def _fill_disk_on_step(monkeypatch, step: int):
    """torch.save as it fails on a full disk (a RuntimeError that has lost its errno), from checkpoint `step` on."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step", 0) >= step:
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_is_a_sentence_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    _fill_disk_on_step(monkeypatch, 4)
    assert train.main(argv(options(tmp_path))) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "no space left on the device holding" in line and "while writing checkpoint step_000004" in line
    assert "GB free" in line and "step_000002 is kept" in line and "--resume" in line
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_000002"]  # no .tmp-step_000004-PID left to block the next save
    checkpoint.verify(root / "step_000002")
    monkeypatch.undo()
    cfg, found = train.resolve_config({"resume": str(tmp_path / "run"), "progress": False})
    assert train.train(cfg, found).step == 4  # space freed: the same command goes on


def test_on_disk_full_continue_trains_on_and_retries(tmp_path, monkeypatch, capsys):
    _fill_disk_on_step(monkeypatch, 4)
    result = train.train(TrainConfig.from_options(**options(tmp_path, max_steps=6, on_disk_full="continue")))
    err = capsys.readouterr().err
    assert result.step == 6 and "training goes on and tries again at the next checkpoint" in err
    assert [p.name for _, p in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_000002"]


def test_a_real_full_disk_on_a_small_tmpfs(tmp_path):
    """The same on a real file system that fills up: a 600 KB tmpfs (mounted in a user namespace of its own)
    holds the first checkpoint of the tiny model (0.4 MB) but not the second."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user namespaces to mount a tmpfs in; the patched-writer tests above cover a full disk")
    mount = tmp_path / "small"
    mount.mkdir()
    opts = options(tmp_path, out_dir=str(mount / "run"), checkpoint_every=2, max_steps=4, keep_last=0)
    script = f"mount -t tmpfs -o size=600k tmpfs {mount} && {sys.executable} -m smollm_ref.train {' '.join(map(shlex.quote, argv(opts)))}"
    script += f"; code=$?; ls -A {mount}/run/checkpoints; {sys.executable} -c \"from smollm_ref import checkpoint; checkpoint.verify(__import__('pathlib').Path('{mount}/run/checkpoints/step_000002')); print('verified')\"; exit $code"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_line_error(done.stderr)
    assert "no space left on the device holding" in line and "step_000002 is kept" in line, line
    assert done.stdout.split() == ["step_000002", "verified"]  # no .tmp-step_000004-PID left, the kept one intact


def test_a_full_disk_while_writing_metrics_is_one_line(tmp_path, monkeypatch, capsys):
    from smollm_ref.train import logger

    def log(self, step, values):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(logger.MetricsLog, "log", log)
    assert train.main(argv(options(tmp_path))) == 2
    line = one_line_error(capsys.readouterr().err)
    # The file and the cause come from the error itself; what to do next comes from the trainer.
    assert os.strerror(errno.ENOSPC) in line and "metrics.jsonl" in line
    assert "--resume" in line


# 6. a partial metrics line


def test_a_partial_last_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path):
    train.train(TrainConfig.from_options(**options(tmp_path)))
    metrics_path = tmp_path / "run" / "metrics.jsonl"
    with open(metrics_path, "a") as f:
        f.write('{"step": 5, "loss": 4.1, "lr"')  # what a kill or a full disk leaves mid-write
    with pytest.warns(UserWarning, match=f"{metrics_path}: dropped a partial last line"):
        cfg, found = train.resolve_config({"resume": str(tmp_path / "run"), "additional_steps": 1, "progress": False})
        train.train(cfg, found)
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]


# 7. SIGINT before the first step


@pytest.mark.parametrize("existing", [False, True])
def test_sigint_during_the_first_validation_removes_what_the_run_wrote(tmp_path, monkeypatch, capsys, existing):
    import smollm_ref.train.objectives.text as text_objective

    real = text_objective.evaluate

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the first validation runs
        return real(*args, **kwargs)

    opts = options(tmp_path, eval_every=2)
    if existing:  # an empty directory the user made: kept, emptied of what the run wrote
        Path(opts["out_dir"]).mkdir()
    monkeypatch.setattr(text_objective, "evaluate", interrupted)
    assert train.main(argv(opts)) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "stopped by SIGINT before the first step; removed" in err and "run the same command again" in err
    run = Path(opts["out_dir"])
    assert run.exists() == existing and (not existing or [p.name for p in run.iterdir()] == [".lock"])
    monkeypatch.undo()
    assert train.main(argv(opts)) == 0  # the same command is not refused


# 9. temporaries of killed runs


def test_temporaries_of_killed_runs_are_swept(tmp_path, capsys):
    """Half-written checkpoints are swept when the next trainer takes the lock (a killed prepare's shards are
    swept by prepare itself: tests/test_data_store.py)."""
    train.train(TrainConfig.from_options(**options(tmp_path)))
    root = tmp_path / "run" / "checkpoints"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [
        root / f".tmp-step_000006-{dead}",
        root / f".old-step_000002-{dead}",
        root / "step_000004" / f".trainer_state.pt.tmp{dead}",
    ]
    for path in stale[:2]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    stale[2].write_bytes(b"half")
    cfg, found = train.resolve_config({"resume": str(tmp_path / "run"), "additional_steps": 1, "progress": False})
    train.train(cfg, found)
    err = capsys.readouterr().err
    assert not any(p.exists() for p in stale)
    assert err.count("left by a run that was killed while writing a checkpoint") == 3
