"""Benchmarks in training (issue 19, "In training"): --eval-tasks / --eval-limit score the model at every
validation; the figures in metrics.jsonl are evaluate()'s on the checkpoint of that step (single process, FSDP
on two gloo ranks, a chat run); a bad task is one line and exit 2 before anything is written; a resume may
change the tasks; the plot draws the figures in a panel of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_runs import argv, one_line_error, tiny_options, wandb_written

from smollm_ref import train
from smollm_ref.evaluate import __main__ as evaluate_cli
from smollm_ref.plot import eval_series, figure
from smollm_ref.plot import main as plot_main
from smollm_ref.train import TrainConfig
from smollm_ref.train.options import FIXED_ON_RESUME

REPO = Path(__file__).resolve().parent.parent


def corpus_task(path: Path, corpus: Path, n: int = 40) -> Path:
    """A task the run learns: the first half of a line of the training corpus, continued by its own second
    half (the gold one) or by the second halves of two other lines."""
    lines = [line for line in corpus.read_text().splitlines() if len(line.strip()) > 24][: n + 2]
    with path.open("w") as f:
        for i in range(n):
            halves = [(line[: len(line) // 2], line[len(line) // 2 :]) for line in lines[i : i + 3]]
            choices = [halves[0][1], halves[1][1], halves[2][1]]
            gold = i % 3
            choices[0], choices[gold] = choices[gold], choices[0]
            f.write(json.dumps({"query": halves[0][0], "choices": choices, "gold": gold}) + "\n")
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def validations(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "val_loss" in r}


def evaluated(checkpoint: Path, task: Path, limit: int, tmp_path: Path, *extra: str) -> dict:
    """python -m smollm_ref.evaluate --checkpoint CHECKPOINT --tasks TASK --limit N, as a user would check a figure."""
    out = tmp_path / f"eval-{checkpoint.name}.json"
    assert (
        evaluate_cli.main(
            ["--checkpoint", str(checkpoint), "--tasks", str(task), "--limit", str(limit), "--output", str(out), *extra]
        )
        == 0
    )
    return json.loads(out.read_text())["results"][task.stem]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """8 steps at a high learning rate (the figures move by then), validation (and a kept checkpoint) every 4,
    scored on 30 of 40 items."""
    tmp = tmp_path_factory.mktemp("eval")
    opts = tiny_options(tmp, max_steps=8, eval_every=4, checkpoint_every=4, keep_last=0, lr=3e-2)
    task = corpus_task(tmp / "lines.jsonl", Path(opts["data"]))
    opts.update(eval_tasks=str(task), eval_limit=30)
    assert train.main(argv(opts)) == 0
    return Path(opts["out_dir"]), task, opts


def test_every_validation_records_the_figures_evaluate_gives_for_that_steps_checkpoint(eval_run, tmp_path):
    run, task, _ = eval_run
    found = validations(run)
    assert sorted(found) == [0, 4, 8]
    keys = {"eval/lines/acc_norm_nospace", "eval/lines/acc"}
    assert all(keys <= set(r) for r in found.values())
    # both figures move as the model trains, and differ from each other: a record of another step's figures,
    # or of one figure under the other's name, would not pass
    for key in keys:
        assert len({found[s][key] for s in found}) > 1, key
    assert any(found[s]["eval/lines/acc"] != found[s]["eval/lines/acc_norm_nospace"] for s in found)
    for step in (4, 8):
        want = evaluated(run / "checkpoints" / f"step_{step:06d}", task, 30, tmp_path)
        assert want["n"] == 30  # --eval-limit: the first 30 of the 40 items
        # the same items, batches and kernels (fp32, CPU): the same float, not an approximation
        assert found[step]["eval/lines/acc_norm_nospace"] == want["acc_norm_nospace"]
        assert found[step]["eval/lines/acc"] == want["acc"]


def test_the_log_says_what_is_scored_and_each_validation_line_shows_it(tmp_path, capsys):
    opts = tiny_options(tmp_path, max_steps=2, eval_every=2)
    task = corpus_task(tmp_path / "lines.jsonl", Path(opts["data"]), n=6)
    assert train.main(argv({**opts, "eval_tasks": str(task), "eval_limit": 4})) == 0
    err = capsys.readouterr().err
    assert "zero-shot benchmarks at each validation: lines (4 items)" in err
    found = validations(Path(opts["out_dir"]))
    for step in (0, 2):
        percent = 100 * found[step]["eval/lines/acc_norm_nospace"]
        assert f"step {step:>6} | val loss {found[step]['val_loss']:.4f} | acc_norm_nospace lines {percent:.1f}%" in err


def test_the_plot_draws_the_figures_in_a_panel_of_their_own(eval_run):
    run, _, _ = eval_run
    fig = figure(run)
    assert len(fig.axes) == 4
    panel = fig.axes[3]
    assert panel.get_ylabel() == "zero-shot accuracy (%)"
    lines = {line.get_label(): line for line in panel.get_lines()}
    assert set(lines) == {"lines", "lines (acc)"}
    found = validations(run)
    for label, key in (("lines", "eval/lines/acc_norm_nospace"), ("lines (acc)", "eval/lines/acc")):
        assert list(lines[label].get_xdata()) == [0, 4, 8]
        assert list(lines[label].get_ydata()) == [100 * found[s][key] for s in (0, 4, 8)]
    assert plot_main([str(run)]) == 0 and (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_eval_tasks_records_and_plots_as_before(tmp_path):
    opts = tiny_options(tmp_path, max_steps=2, eval_every=2)
    train.train(TrainConfig.from_options(**opts))
    run = Path(opts["out_dir"])
    assert all(not k.startswith("eval/") for r in records(run) for k in r)
    assert len(figure(run).axes) == 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.5, "not a fraction from 0 to 1"), ("0.5", "is '0.5'"), (None, "is None"), (float("nan"), "is nan")],
)
def test_a_damaged_figure_is_one_line_naming_file_line_and_key(tmp_path, capsys, value, expected):
    run = tmp_path / "run"
    run.mkdir()
    good = {"step": 1, "loss": 5.0, "lr": 1e-3, "tokens_per_sec": 1.0, "avg_tokens_per_sec": 1.0}
    bad = {"step": 2, "val_loss": 4.0, "eval/piqa/acc": value}
    (run / "metrics.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert plot_main([str(run)]) == 2
    line = one_line_error(capsys)
    assert f"{run / 'metrics.jsonl'} line 2: 'eval/piqa/acc'" in line and expected in line, line
    assert not (run / "metrics.png").exists()


def test_eval_series_keeps_each_task_where_it_was_scored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "val_loss": 5.0, "eval/a/acc_norm_nospace": 0.25, "eval/a/acc": 0.5},
        {"step": 2, "val_loss": 4.0, "eval/a/acc_norm_nospace": 0.5, "eval/a/acc": 0.25, "eval/b/acc": 1.0},
        {"step": 3, "eval/other": 7, "evaluation/a/acc": 3},  # not the trainer's eval/TASK/FIGURE keys: not drawn
    ]
    got = eval_series(path, list(enumerate(rows, 1)))
    assert got == {
        "a": {"acc_norm_nospace": [(0, 0.25), (2, 0.5)], "acc": [(0, 0.5), (2, 0.25)]},
        "b": {"acc": [(2, 1.0)]},
    }


def test_wandb_gets_the_same_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    opts = tiny_options(tmp_path, max_steps=2, eval_every=2, wandb=True)
    task = corpus_task(tmp_path / "lines.jsonl", Path(opts["data"]), n=4)
    train.train(TrainConfig.from_options(**{**opts, "eval_tasks": str(task)}))
    wandb_written()
    (log,) = (Path(opts["out_dir"]) / "wandb").glob("offline-run-*/run-*.wandb")
    blob = log.read_bytes()
    for key in (b"val_loss", b"eval/lines/acc_norm_nospace", b"eval/lines/acc"):
        assert key in blob, key


# bad input: one line, exit 2, before anything is written


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown", "TrainConfig.eval_tasks (--eval-tasks) must be comma-separated tasks (unknown task 'arc_eazy'"),
        ("missing file", "does not exist; fix the task, or pass --eval-tasks '' to train without benchmarks"),
        ("bad record", "lines.jsonl:1: gold must be the index of the right choice"),
        ("no validation", "TrainConfig.eval_tasks needs eval_every"),
    ],
)
def test_a_bad_task_is_one_line_and_exit_2_before_the_run_directory_exists(tmp_path, capsys, case, expected):
    opts = tiny_options(tmp_path, eval_every=2)
    bad = tmp_path / "lines.jsonl"
    bad.write_text(json.dumps({"query": "q", "choices": [" a", " b"], "gold": 2}) + "\n")
    tasks = {"unknown": "piqa,arc_eazy", "missing file": str(tmp_path / "nope.jsonl"), "bad record": str(bad)}
    opts["eval_tasks"] = tasks.get(case, "piqa")
    if case == "no validation":
        opts["eval_every"] = 0
    assert train.main(argv(opts)) == 2
    assert expected in one_line_error(capsys)
    assert not Path(opts["out_dir"]).exists()  # no step taken, nothing written


def test_recipes_take_the_keys_and_check_their_values(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"eval_tasks": "arc_easy,piqa", "eval_limit": 50}))
    assert train.read_recipe(recipe) == {"eval_tasks": "arc_easy,piqa", "eval_limit": 50}
    recipe.write_text(json.dumps({"eval_tasks": "arc_eazy"}))
    with pytest.raises(train.TrainError, match=r"recipe .*r\.json: TrainConfig\.eval_tasks .*\(unknown task 'arc_eazy'"):
        train.read_recipe(recipe)
    assert TrainConfig().eval.eval_tasks == "" and "eval_tasks" not in FIXED_ON_RESUME and "eval_limit" not in FIXED_ON_RESUME


# resume


def test_a_resume_keeps_the_tasks_or_changes_them(tmp_path):
    opts = tiny_options(tmp_path, max_steps=4, eval_every=2, keep_last=0)
    first = corpus_task(tmp_path / "first.jsonl", Path(opts["data"]), n=6)
    second = corpus_task(tmp_path / "second.jsonl", Path(opts["data"]), n=9)
    assert train.main(argv({**opts, "eval_tasks": str(first), "eval_limit": 5})) == 0
    run = Path(opts["out_dir"])
    # options not given come from the run: the same task, the same limit
    assert train.main(["--resume", str(run), "--additional-steps", "2", "--no-progress"]) == 0
    assert set(validations(run)[6]) >= {"eval/first/acc", "eval/first/acc_norm_nospace"}
    # other tasks and another limit from step 6 on; the steps before keep what they recorded
    resumed = ["--resume", str(run), "--additional-steps", "2", "--no-progress", "--eval-tasks", f"{first},{second}"]
    assert train.main([*resumed, "--eval-limit", "8"]) == 0
    found = validations(run)
    assert {k for k in found[8] if k.startswith("eval/")} == {
        f"eval/{t}/{f}" for t in ("first", "second") for f in ("acc", "acc_norm_nospace")
    }
    assert not any(k.startswith("eval/second") for s in (0, 2, 4, 6) for k in found[s])
    assert json.loads((run / "train_config.json").read_text())["eval_limit"] == 8
    # the resumed run's figures are those of its own checkpoint: evaluate() on step 8 gives them
    want = evaluated(run / "checkpoints" / "step_000008", second, 8, tmp_path)
    assert found[8]["eval/second/acc_norm_nospace"] == want["acc_norm_nospace"] and found[8]["eval/second/acc"] == want["acc"]
    # and an empty --eval-tasks turns them off
    assert train.main(["--resume", str(run), "--additional-steps", "2", "--no-progress", "--eval-tasks", ""]) == 0
    assert not any(k.startswith("eval/") for k in validations(run)[10])
    panel = figure(run).axes[3]
    assert {line.get_label(): list(line.get_xdata()) for line in panel.get_lines()} == {
        "first": [0, 2, 4, 6, 8],
        "first (acc)": [0, 2, 4, 6, 8],
        "second": [8],
        "second (acc)": [8],
    }


# other runs: a fine-tune's start, chat, FSDP


def test_a_fine_tune_is_scored_before_its_first_step(eval_run, tmp_path):
    run, task, _ = eval_run
    start = run / "checkpoints" / "step_000008"
    opts = tiny_options(tmp_path, model_config=None, init_from=str(start), max_steps=1, eval_every=1)
    assert train.main(argv({**opts, "eval_tasks": str(task), "eval_limit": 30})) == 0
    want = evaluated(start, task, 30, tmp_path)
    assert validations(Path(opts["out_dir"]))[0]["eval/lines/acc_norm_nospace"] == want["acc_norm_nospace"]


def test_a_chat_run_is_scored_with_its_own_tokenizer_and_chat_template(tmp_path, capsys):
    from test_train_chat import chat_options, conversations, write_jsonl

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(24))
    task = tmp_path / "sq.jsonl"
    words = "squared is because multiplication and cubed explain answer briefly".split()
    with task.open("w") as f:
        for i in range(24):  # enough items of varied choices for the template to change the figures
            choices = [" " + " ".join(words[(i * k + j) % len(words)] for j in range(1 + (i + k) % 3)) for k in range(3)]
            f.write(json.dumps({"query": f"What is {i} squared?", "choices": choices, "gold": i % 3}) + "\n")
    opts = chat_options(data, tmp_path / "run", max_steps=2, checkpoint_every=2, eval_every=2, eval_tasks=str(task))
    assert train.main(argv(opts)) == 0
    assert (
        "zero-shot benchmarks at each validation (each question in the chat template): sq (24 items)" in capsys.readouterr().err
    )
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    want = evaluated(checkpoint, task, 24, tmp_path, "--chat-template")
    got = validations(tmp_path / "run")[2]
    assert got["eval/sq/acc_norm_nospace"] == want["acc_norm_nospace"] and got["eval/sq/acc"] == want["acc"]
    # without the template the figures differ: a run that dropped it would not pass the equality above
    bare = evaluated(checkpoint, task, 24, tmp_path)
    assert (bare["acc_norm_nospace"], bare["acc"]) != (want["acc_norm_nospace"], want["acc"])


# A process group of one in a process of its own: fully_shard makes the parameters DTensors all the same, and the
# root's are sharded again after a backward pass, which is where a validation finds them.
SHARDED_SCORING = """
import contextlib, json, sys, tempfile
from pathlib import Path
import torch, torch.distributed as dist
from smollm_ref import distributed
from smollm_ref.config import ModelConfig
from smollm_ref.evaluate import evaluate
from smollm_ref.model import LlamaForCausalLM
from smollm_ref.tokenizer import from_directory
from smollm_ref.train import EvalOptions
from smollm_ref.train.evaluator import Evaluator
from smollm_ref.train import lm_loss

task, source = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1)
model = LlamaForCausalLM(ModelConfig.from_json(source / "config.json"))
tok = from_directory(source)
evaluator = Evaluator.build(EvalOptions(eval_tasks=task, eval_limit=0), tok, model.config.max_position_embeddings)
distributed.wrap(model, distributed.Dist(0, 2, 0), True, torch.device("cpu"))
x = torch.randint(0, 300, (2, 17))
lm_loss(model, x[:, :-1], x[:, 1:]).backward()
before = type(model.model.embed_tokens.weight).__name__
got = evaluator(model, contextlib.nullcontext())
after = type(model.model.embed_tokens.weight).__name__, model.training
plain = LlamaForCausalLM(model.config)
plain.load_state_dict(distributed.full_model_state(model))
print(json.dumps({"before": before, "after": after, "got": got, "want": evaluate(plain, tok, task)["results"]}))
dist.destroy_process_group()
"""


def test_a_sharded_model_is_scored_with_its_root_gathered(eval_run):
    """Scoring calls model.model and model.lm_head, past the root's forward hook that gathers the embedding,
    final norm and lm_head: the evaluator gathers them itself (and shards them again)."""
    _, task, base = eval_run
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    source = str(Path(base["model_config"]).parent)
    done = subprocess.run(
        [sys.executable, "-c", SHARDED_SCORING, str(task), source], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["before"] == "DTensor"  # what the test is about: the root's parameters are sharded when scoring starts
    assert out["after"] == ["DTensor", True]  # sharded again, and back in training mode
    want = out["want"]["lines"]
    assert out["got"] == {"eval/lines/acc_norm_nospace": want["acc_norm_nospace"], "eval/lines/acc": want["acc"]}


def test_fsdp_ranks_score_the_gathered_model_as_one_process_does(eval_run, tmp_path):
    """Two gloo ranks under FSDP2: every rank scores every item (the forward passes are collectives; a rank that
    did not would hang the others), and rank 0 records evaluate()'s figures for the gathered checkpoint."""
    _, task, base = eval_run
    opts = {**base, "out_dir": str(tmp_path / "two"), "max_steps": 2, "eval_every": 2, "checkpoint_every": 2, "fsdp": True}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "smollm_ref.train"]
    done = subprocess.run([*command, *argv(opts)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = validations(tmp_path / "two")
    assert sorted(found) == [0, 2]
    want = evaluated(tmp_path / "two" / "checkpoints" / "step_000002", task, 30, tmp_path)
    # a global batch of 4 for 2 steps: other weights than eval_run's at step 2, scored as one process scores them
    assert found[2]["eval/lines/acc_norm_nospace"] == want["acc_norm_nospace"] and found[2]["eval/lines/acc"] == want["acc"]
