"""The trainer end to end on the tiny preset and a small corpus: learning, exact resume across processes,
checkpoints (corruption, signals, transformers), WandB offline, DDP on gloo, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import FORMAT1, argv, tiny_options, wandb_written
from waiting import logged_steps, wait_until

from smollm_ref import checkpoint, train
from smollm_ref.configs import preset_path
from smollm_ref.train import ModelOptions, OptimOptions, TrainConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 7,000 tokens of real Python source."""
    lib = Path(sysconfig.get_paths()["stdlib"]) / "json"
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text((lib / "decoder.py").read_text() + (lib / "encoder.py").read_text())
    return path


def options(corpus: Path, out_dir: Path, **changes) -> dict:
    base = dict(
        model_config="smollm2-tiny",
        data=str(corpus),
        out_dir=str(out_dir),
        batch_size=2,
        seq_len=32,
        max_steps=4,
        checkpoint_every=2,
        lr=3e-3,
        eval_every=0,
        log_every=100,
        sample_tokens=8,
        progress=False,
    )
    base.update(changes)
    return base


def run_cli(args: list[str], torchrun: int = 0, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    prefix = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
        if torchrun
        else [sys.executable]
    )
    return subprocess.run(
        [*prefix, "-m", "smollm_ref.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    result = train.train(TrainConfig.from_options(**options(corpus, out, eval_every=2)))
    assert result.step == 4 and result.checkpoint == out / "checkpoints" / "step_000004"
    return out


# configuration


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"batch_size": -1}, "batch_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"lr": 0.0}, "lr"),
        ({"precision": "fp8"}, "precision"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"grad_accum": "2"}, "grad_accum"),
        ({"compile": 1}, "compile"),
        ({"additional_steps": 5}, "additional_steps"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig.from_options(**changes)


def test_recipe_unknown_keys_are_errors_and_cli_overrides_recipe(tmp_path, corpus):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"max_step": 3}))
    with pytest.raises(train.TrainError, match=r"unknown option\(s\) \['max_step'\]"):
        train.read_recipe(recipe)
    recipe.write_text(
        json.dumps({**options(corpus, tmp_path / "run"), "max_steps": 7, "checkpoint_every": 1000, "_comment": "notes are fine"})
    )
    assert train.main(["--recipe", str(recipe), "--max-steps", "2"]) == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["max_steps"] == 2
    assert sorted(losses(tmp_path / "run")) == [1, 2]


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--init-from",
        "--resume",
        "--additional-steps",
        "--precision",
        "--lr-schedule",
        "--wandb",
        "--keep-last",
        "--fsdp",
        "--recipe",
    ):
        assert flag in text


def test_lr_schedules():
    cfg = OptimOptions(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, lr_schedule="cosine")
    assert train.lr_at(0, cfg) == pytest.approx(0.1) and train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(10, cfg) == pytest.approx(1.0) and train.lr_at(60, cfg) == pytest.approx(0.55)
    assert train.lr_at(110, cfg) == pytest.approx(0.1) and train.lr_at(500, cfg) == pytest.approx(0.1)
    wsd = dataclasses.replace(cfg, lr_schedule="wsd", wsd_decay_fraction=0.2, max_steps=100)
    assert (
        train.lr_at(79, wsd) == 1.0
        and train.lr_at(90, wsd) == pytest.approx(0.55)
        and train.lr_at(100, wsd) == pytest.approx(0.1)
    )
    assert train.lr_at(50, dataclasses.replace(cfg, lr_schedule="constant")) == 1.0


def test_optimizer_does_not_decay_norms_or_the_tied_embedding():
    from smollm_ref.config import ModelConfig
    from smollm_ref.model import LlamaForCausalLM

    model = LlamaForCausalLM(ModelConfig.from_name("smollm2-tiny"))
    opt = train.make_optimizer(model, OptimOptions(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }
    assert all(p.dim() == 2 for p in decay["params"]) and len(decay["params"]) == 2 * 7
    assert opt.defaults["fused"] is True  # CPU has a fused AdamW kernel (3-5x faster than foreach at 135M parameters)
    sharded = train.make_optimizer(model, OptimOptions(weight_decay=0.1), sharded=True)
    assert sharded.defaults["foreach"] is True and not sharded.defaults["fused"]  # FSDP2's DTensors: foreach


# learning


def test_overfitting_one_batch_drives_the_loss_near_zero(corpus, tmp_path):
    cfg = TrainConfig.from_options(
        **options(
            corpus,
            tmp_path / "run",
            overfit_single_batch=True,
            max_steps=60,
            checkpoint_every=1000,
            lr=1e-2,
            warmup_steps=5,
            weight_decay=0.0,
        )
    )
    result = train.train(cfg)
    curve = losses(tmp_path / "run")
    assert curve[1] > 9.0  # ln(49152) = 10.8 at initialisation
    assert result.loss < 0.05, curve


def test_fast_step_trains_like_the_reference_step(corpus, tmp_path, capsys):
    """The trainer's default bf16-mixed step (smollm_ref.fast) against --no-fast (the reference model under
    autocast): the same losses step by step and the same weight updates, within bf16 rounding. (fp32 runs
    take the reference step.) On CPU, where the tolerances were measured."""
    curves, weights = {}, {}
    for fast in (True, False):
        out = tmp_path / f"fast-{fast}"
        opts = options(corpus, out, max_steps=5, checkpoint_every=1, keep_last=0, optimizer_state="latest")
        train.train(TrainConfig.from_options(**opts, precision="bf16-mixed", device="cpu", fast=fast))
        curves[fast] = losses(out)
        weights[fast] = [load_file(out / "checkpoints" / f"step_{s:06d}" / "model.safetensors") for s in (1, 5)]
    assert list(curves[True]) == list(curves[False]) == [1, 2, 3, 4, 5]
    # bf16 rounding: the fast step rounds in other places than autocast (fused q|k|v and gate|up, the chunked
    # loss), and the curves drift apart by at most 6.7e-5 relative over these 5 steps. (With the fast step's
    # attention weights frozen they differ by 4e-4 at step 2 and 1.9e-2 at step 4.)
    for step, loss in curves[False].items():
        assert curves[True][step] == pytest.approx(loss, rel=2e-4, abs=0), (step, curves)
    # Every parameter moves as the reference moves it: the runs' weights at step 5 differ by at most 6.3% of
    # the reference's own update from step 1 to 5 (Adam divides each gradient element by its running RMS,
    # so bf16 rounding in the smallest gradients shows up whole in their updates). A parameter the fast step
    # sent no gradient (one frozen RMSNorm weight, which moves the losses by only 7e-5) differs by 127%.
    (fast1, fast5), (ref1, ref5) = weights[True], weights[False]
    assert fast1.keys() == ref5.keys()
    for name, ref in ref5.items():
        drift = float((fast5[name] - ref).norm() / (ref - ref1[name]).norm())
        assert drift < 0.15, (name, drift)
    assert curves[True][5] < curves[True][1] - 0.2  # and it learns
    log = capsys.readouterr()
    assert "bf16-mixed, fast step" in log.out + log.err and "bf16-mixed, reference step (--no-fast)" in log.out + log.err


def _dropout_config(tmp_path: Path, p: float) -> Path:
    path = tmp_path / f"dropout-{p}.json"
    config = json.loads((FORMAT1 / "step_000002" / "config.json").read_text())
    path.write_text(json.dumps({**config, "attention_dropout": p}))
    return path


def test_attention_dropout_run_takes_the_reference_step(tmp_path, capsys):
    """The fast step has no attention dropout: a bf16-mixed run of a model with attention_dropout 0.3 takes
    the reference step (and says why), so it trains what --no-fast trains, the same losses to the bit."""
    curves = {}
    for fast in (True, False):
        out = tmp_path / f"fast-{fast}"
        opts = tiny_options(tmp_path, model_config=str(_dropout_config(tmp_path, 0.3)), out_dir=str(out), checkpoint_every=1000)
        train.train(TrainConfig.from_options(**opts, precision="bf16-mixed", device="cpu", fast=fast))
        curves[fast] = losses(out)
    assert list(curves[True]) == [1, 2, 3, 4] and curves[True] == curves[False]
    log = capsys.readouterr()
    assert "bf16-mixed, reference step (attention_dropout 0.3 is applied in training mode" in log.out + log.err


def test_fast_step_unsupported_is_the_one_choice_and_says_why(tmp_path):
    from smollm_ref.config import ModelConfig
    from smollm_ref.model import LlamaForCausalLM
    from smollm_ref.train.objectives import ChatObjective
    from smollm_ref.train.step import fast_forward, fast_step_unsupported

    model = LlamaForCausalLM(ModelConfig.from_json(_dropout_config(tmp_path, 0.0)))
    cfg = ModelOptions()
    assert fast_step_unsupported(model, cfg, 1, "bf16-mixed") is None
    fast, why = fast_forward(model, cfg, 1, "fp16-mixed")
    assert why is None and fast.dtype == torch.float16
    cases = [
        ((model, ModelOptions(fast=False), 1, "bf16-mixed"), "--no-fast"),
        ((model, cfg, 1, "fp32"), "fp32"),
        ((model, cfg, 2, "bf16-mixed"), "several processes"),
        ((model, ModelOptions(fsdp=True), 1, "bf16-mixed"), "FSDP"),
        ((model, cfg, 1, "bf16-mixed", ChatObjective.fast_step_unsupported), "chat rows"),
    ]
    dropout = LlamaForCausalLM(ModelConfig.from_json(_dropout_config(tmp_path, 0.3))).eval()
    cases.append(((dropout, cfg, 1, "bf16-mixed"), "attention_dropout 0.3"))  # trained in training mode, whatever its mode now
    for args, reason in cases:
        assert reason in fast_step_unsupported(*args)
        assert fast_forward(*args) == (None, fast_step_unsupported(*args))


def test_adamw_policy_fused_step_matches_default_adamw():
    """The one AdamW policy (trainer and bench): the fused kernel where the device has one, same updates."""
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    opt_a = train.adamw([{"params": list(a.parameters()), "weight_decay": 0.1}], lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert opt_a.defaults["fused"] is True
    x = torch.randn(16, 8)
    for _ in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            m(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):  # the kernels round apart: measured 1.5e-8 (weights up to 0.31)
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)
    assert len(train.adamw(a.parameters(), lr=1e-3).param_groups[0]["params"]) == 2  # a generator is read once


def test_train_step_uses_the_given_loss_fn():
    from smollm_ref.config import ModelConfig
    from smollm_ref.fast import FastForward
    from smollm_ref.model import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_name("smollm2-tiny"))
    x = torch.randint(0, 49152, (2, 17))
    calls = []
    fast = FastForward(model)

    def loss_fn(inputs, targets):
        calls.append(inputs.shape)
        return fast.lm_loss(inputs, targets)

    expected = float(train.lm_loss(model, x[:, :-1], x[:, 1:]))
    stats = train.train_step(model, [(x[:, :-1], x[:, 1:])], torch.optim.SGD(model.parameters(), lr=0.0), loss_fn=loss_fn)
    assert calls == [torch.Size([2, 16])]
    # the fast loss against the reference's in float32: measured 1 ulp (9.5e-7 at 10.8)
    assert float(stats.loss) == pytest.approx(expected, rel=2e-7, abs=0)


def test_checkpoint_loads_in_transformers_as_the_same_model(finished_run):
    from transformers import AutoModelForCausalLM

    from smollm_ref.weights import from_pretrained

    ckpt = finished_run / "checkpoints" / "step_000004"
    ours = from_pretrained(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert (ckpt / "tokenizer.json").exists()


def test_run_directory_records_metrics_samples_and_plots(finished_run):
    from smollm_ref.plot import plot_run

    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "step_time", "tokens_per_sec", "avg_tokens_per_sec", "tokens"):
        assert all(isinstance(r[key], (int, float)) for r in steps), key
    assert steps[-1]["tokens"] == 4 * 2 * 32
    assert "mfu" not in steps[-1]  # no known peak for a CPU
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert [r["step"] for r in records if "sample" in r] == [2, 4]
    png = plot_run(finished_run)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# resume


@pytest.mark.parametrize(
    "extra",
    [
        {"precision": "fp32"},
        {"precision": "bf16-mixed", "grad_accum": 2, "lr_schedule": "cosine", "warmup_steps": 2},
        {"precision": "bf16-mixed", "fast": False},
    ],
    ids=["fp32", "bf16-accum-cosine", "bf16-reference-step"],
)
def test_resume_in_a_new_process_is_exact(corpus, tmp_path, extra):
    n = 6
    common = options(corpus, tmp_path / "x", max_steps=n, checkpoint_every=n // 2, lr_decay_steps=n, **extra)
    straight, split = tmp_path / "straight", tmp_path / "split"
    for args in (
        argv({**common, "out_dir": straight}),
        argv({**common, "out_dir": split, "max_steps": n // 2}),
        ["--resume", str(split), "--additional-steps", str(n // 2)],
    ):
        proc = run_cli(args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr
    a, b = losses(straight), losses(split)
    assert list(a) == list(b) == list(range(1, n + 1))
    assert a == b  # the same float at every step, not merely close
    final = f"checkpoints/{checkpoint.step_dir_name(n)}"
    wa, wb = load_file(straight / final / "model.safetensors"), load_file(split / final / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = checkpoint.load_state(straight / final), checkpoint.load_state(split / final)
    assert sa["data_position"] == sb["data_position"] and sa["tokens"] == sb["tokens"]
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path):
    out = tmp_path / "run"
    train.train(TrainConfig.from_options(**options(corpus, out)))
    weights = out / "checkpoints" / "step_000004" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="step_000004.*checksum.*falling back"):
        cfg, found = train.resolve_config({"resume": "auto", "out_dir": str(out)})
    # the model comes from the checkpoint's own config.json, not from a preset name or path the run recorded
    assert found.name == "step_000002" and cfg.model.model_config is None and cfg.data.seq_len == 32
    result = train.train(cfg, found)
    assert result.step == 4
    checkpoint.verify(out / "checkpoints" / "step_000004")  # rewritten whole


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "smollm_ref.train", *argv(options(corpus, out, max_steps=100_000, checkpoint_every=100_000))],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: len(logged_steps(out)) >= 2, "two logged steps", proc)  # in the loop, not still starting
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    last = max(losses(out))
    saved = checkpoint.find(out)
    assert saved.name == checkpoint.step_dir_name(last)
    assert checkpoint.load_state(saved)["step"] == last


def test_wandb_offline_run_records_the_metrics_and_keeps_its_id(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.train(TrainConfig.from_options(**options(corpus, out, wandb=True, max_steps=2)))
    run_id = checkpoint.load_state(out / "checkpoints" / "step_000002")["wandb_run_id"]
    assert run_id
    cfg, found = train.resolve_config({"resume": str(out), "additional_steps": 2})
    train.train(cfg, found)
    assert checkpoint.load_state(out / "checkpoints" / "step_000004")["wandb_run_id"] == run_id
    wandb_written()
    logs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 2  # the resumed process continued the same run id
    for log in logs:
        blob = log.read_bytes()
        for key in (b"loss", b"grad_norm", b"tokens_per_sec"):
            assert key in blob


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(corpus, tmp_path, sharding):
    common = options(corpus, tmp_path / "x", max_steps=3, checkpoint_every=3, precision="fp32")
    # The ranks run the reference step (the fast one cannot sit under DDP/FSDP); so does this process.
    one = run_cli(argv({**common, "out_dir": tmp_path / "one", "batch_size": 4, "fast": False}))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli(argv({**common, "out_dir": tmp_path / "two", "batch_size": 2, "fsdp": sharding == "fsdp"}), torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(a) == list(b) == [1, 2, 3]
    for step in a:  # the ranks' gradients are summed in another order: measured 9e-8 relative (1 ulp)
        assert b[step] == pytest.approx(a[step], rel=5e-7, abs=0)
    state = checkpoint.load_state(tmp_path / "two" / "checkpoints" / "step_000003")
    assert state["world_size"] == 2 and state["data_position"] == 12
    wa = load_file(tmp_path / "one" / "checkpoints" / "step_000003" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "checkpoints" / "step_000003" / "model.safetensors")
    # Adam divides by sqrt(v) + 1e-8, so elements whose gradient is ~1e-9 move by a step-sized amount that
    # depends on float32 summation order: allow 1% of one step's lr for those (measured 0.55%), and require
    # near-equality elsewhere (measured: 8 and 13 of 3.2M elements differ by more than 1e-6, ddp and fsdp).
    lr = common["lr"]
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 0.01 * lr
    differing = sum(int(((wa[k] - wb[k]).abs() > 1e-6).sum()) for k in wa)
    assert differing < 2e-5 * sum(v.numel() for v in wa.values())


# bad input


def _other_shape(tmp_path: Path) -> Path:
    path = tmp_path / "other.json"
    config = json.loads(preset_path("smollm2-tiny").read_text())
    path.write_text(json.dumps({**config, "hidden_size": 32, "head_dim": 8}))
    return path


BAD_INPUTS = {
    "missing data": (lambda c, t: {"data": str(t / "nope.txt")}, "does not exist"),
    "empty corpus": (lambda c, t: {"data": str(_write(t / "empty.txt", ""))}, "empty"),
    "corpus shorter than a sequence": (lambda c, t: {"data": str(_write(t / "short.txt", "x = 1\n"))}, "fewer than one sequence"),
    "seq len beyond positions": (lambda c, t: {"seq_len": 4096}, "exceeds the model's 1024 positions"),
    "zero steps": (lambda c, t: {"max_steps": 0}, r"max_steps \(--max-steps\) must be a positive integer"),
    "negative batch": (lambda c, t: {"batch_size": -2}, r"batch_size \(--batch-size\) must be a positive integer"),
    "fp16 on cpu": (lambda c, t: {"precision": "fp16-mixed", "device": "cpu"}, "fp16-mixed needs a CUDA device"),
    "missing resume path": (lambda c, t: {"resume": str(t / "no-such-run")}, "resume path .* does not exist"),
    "resume other shape": (lambda c, t: {"resume": str(c), "model_config": str(_other_shape(t))}, "another shape"),
    "unwritable out dir": (lambda c, t: {"out_dir": str(_write(t / "a-file", "") / "run")}, "cannot write to --out-dir"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error_and_changes_nothing(case, corpus, finished_run, tmp_path, capsys):
    make, message = BAD_INPUTS[case]
    ckpt = finished_run / "checkpoints" / "step_000004"
    opts = {**options(corpus, tmp_path / "run"), **make(ckpt, tmp_path)}
    before = sorted(p.name for p in tmp_path.iterdir())
    snapshot = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    assert train.main(argv(opts)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert __import__("re").search(message, err[0]), err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory left behind
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == snapshot


def test_existing_run_dir_is_refused_without_resume_or_overwrite(corpus, finished_run, capsys):
    snapshot = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    opts = options(corpus, finished_run)
    assert train.main(argv(opts)) == 2
    assert "already exists; pass --resume auto" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == snapshot


def test_cli_error_exit_code_and_single_line_in_a_real_process(corpus, tmp_path):
    proc = run_cli(argv(options(corpus, tmp_path / "run", data=str(tmp_path / "missing.txt"))))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: data path {tmp_path / 'missing.txt'} does not exist; pass a file, a directory, a glob, hf:NAME or stdlib"
    ]


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_message(corpus, tmp_path, capsys):
    from smollm_ref.config import ModelConfig
    from smollm_ref.model import LlamaForCausalLM

    model = LlamaForCausalLM(ModelConfig.from_name("smollm2-tiny"))
    opt = train.make_optimizer(model, OptimOptions())
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 1000, (2, 9))
    stats = train.train_step(model, [(x[:, :-1], x[:, 1:])], opt, lr=1e-3)
    assert stats.skipped and not torch.isfinite(torch.tensor(stats.grad_norm))
    assert all(torch.equal(v, before[k]) or torch.isnan(before[k]).any() for k, v in model.state_dict().items())
    assert not opt.state  # no update was made, so Adam never started

    # a learning rate this large sends the weights to inf after one update; the next steps are all bad
    assert train.main(argv(options(corpus, tmp_path / "run", lr=1e30, grad_clip=0.0, max_bad_steps=2, max_steps=50))) == 1
    err = capsys.readouterr().err
    assert "update skipped (1 in a row)" in err and "error: training diverged: 2 non-finite steps in a row" in err


def test_continue_training_api_extends_a_run(corpus, tmp_path):
    out = tmp_path / "run"
    train.train(TrainConfig.from_options(**options(corpus, out, max_steps=2)))
    result = train.continue_training(out / "checkpoints" / "step_000002", additional_steps=2)
    assert result.step == 4 and result.checkpoint == out / "checkpoints" / "step_000004"
    assert sorted(losses(out)) == [1, 2, 3, 4]
