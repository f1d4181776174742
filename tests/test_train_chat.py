"""Chat fine-tuning in the trainer (issue 13): the step's loss is the sum over its trained tokens divided
by their number in the whole step, so k uneven micro-batches (or two gloo ranks) give one big batch's
gradients; a chat run trains on assistant replies only, reports the assistant-only validation loss,
samples chat replies before and after, keeps the chat template; bad chat data is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import FORMAT1, GradientCapture, argv

from smollm_ref import checkpoint, train
from smollm_ref.config import ModelConfig
from smollm_ref.data.conversations import chat_data
from smollm_ref.model import LlamaForCausalLM
from smollm_ref.train import TrainConfig
from smollm_ref.train.objectives import sft_loss_sum, trained_tokens
from smollm_ref.train.step import train_step

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    from smollm_ref.tokenizer import load_tokenizer

    return load_tokenizer()  # SmolLM2's own, with its chat template


def conversations(n: int) -> list[dict]:
    """Conversations of very different lengths, some with a system prompt, some with two turns."""
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "Answer briefly."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"What is {i} squared?" + " Explain." * (i % 4)}]
        messages += [{"role": "assistant", "content": f"{i} squared is {i * i}." + " Because multiplication." * (i % 5)}]
        if i % 4 == 1:
            messages += [{"role": "user", "content": "And cubed?"}, {"role": "assistant", "content": f"{i**3}."}]
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("pack", [True, False])
def test_uneven_micro_batches_give_the_gradients_of_one_batch(tok, tmp_path, pack):
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_name("smollm2-tiny"))
    rows = chat_data(str(write_jsonl(tmp_path / "c.jsonl", conversations(12))), tok, 96, 0.0, pack=pack).train
    indices = list(range(len(rows)))[:6]
    micro = [rows.batch(indices[:1]), rows.batch(indices[1:4]), rows.batch(indices[4:6])]  # 1, 3 and 2 rows
    counts = [int(trained_tokens([b])) for b in micro]
    assert len(set(counts)) == 3  # uneven: a mean of means would weigh them wrong
    whole = rows.batch(indices)
    loss_fn = lambda *b: sft_loss_sum(model, *b)  # noqa: E731
    a, b = GradientCapture(model.parameters()), GradientCapture(model.parameters())
    stats = train_step(model, micro, a, grad_clip=0.0, loss_fn=loss_fn, divide_by=float(sum(counts)))
    one = train_step(model, [whole], b, grad_clip=0.0, loss_fn=loss_fn, divide_by=float(trained_tokens([whole])))
    assert float(trained_tokens([whole])) == sum(counts)
    assert float(stats.loss) == pytest.approx(float(one.loss), rel=1e-6)
    for ga, gb in zip(a.grads, b.grads):
        torch.testing.assert_close(ga, gb)  # float32 rounding: the sums are taken in another order
    # the mean of the micro-batches' means is a different (wrong) gradient: the test can tell them apart
    wrong = GradientCapture(model.parameters())
    mean_fn = lambda ids, labels, pos: sft_loss_sum(model, ids, labels, pos) / trained_tokens([(ids, labels, pos)])  # noqa: E731
    train_step(model, micro, wrong, grad_clip=0.0, loss_fn=mean_fn)
    assert max(float((x - y).abs().max()) for x, y in zip(wrong.grads, b.grads)) > 1e-4


def chat_options(data: Path | str, out: Path, **changes) -> dict:
    base = dict(
        model_config="smollm2-tiny",
        data=str(data),
        out_dir=str(out),
        batch_size=2,
        seq_len=128,
        max_steps=3,
        checkpoint_every=3,
        eval_every=3,
        eval_batches=2,
        val_fraction=0.2,
        log_every=100,
        sample_tokens=8,
        progress=False,
        lr=3e-3,
    )
    base.update(changes)
    return base


def test_two_gloo_ranks_with_uneven_rows_equal_one_process(tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", conversations(40))
    common = chat_options(data, tmp_path / "x", pack=False, eval_every=0, precision="fp32")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(opts, torchrun=0):
        prefix = (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
            if torchrun
            else [sys.executable]
        )
        done = subprocess.run(
            [*prefix, "-m", "smollm_ref.train", *argv(opts)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]

    run({**common, "out_dir": str(tmp_path / "one"), "batch_size": 4})
    run({**common, "out_dir": str(tmp_path / "two"), "batch_size": 2}, torchrun=2)

    def rows(run_dir):
        return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert list(a) == list(b) == [1, 2, 3]
    for step in a:
        assert a[step]["trained_tokens"] == b[step]["trained_tokens"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
    wa, wb = (load_file(tmp_path / r / "checkpoints" / "step_000003" / "model.safetensors") for r in ("one", "two"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 0.01 * common["lr"]


def test_a_chat_run_trains_on_replies_and_keeps_the_chat_template(tmp_path, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [*conversations(30), {"messages": [{"role": "user", "content": "no reply"}]}])
    result = train.train(TrainConfig.from_options(**chat_options(data, tmp_path / "run")))
    err = capsys.readouterr().err
    assert "chat data: 31 conversations, 24 to train and 6 held out; 1 without an assistant reply skipped; packed into" in err
    assert "reference step (the fast step does not take chat rows yet)" not in err  # fp32: the reference step anyway
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in records if "sample" in r]
    assert [r["step"] for r in samples] == [0, 3]  # before and after
    assert all(r["sample"].startswith("user: What does the Python module `json` do?\nassistant: ") for r in samples)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3] and result.val_loss is not None
    assert all("trained_tokens" in r for r in records if "loss" in r)
    saved = checkpoint.find(tmp_path / "run")
    from smollm_ref.tokenizer import load_tokenizer

    assert "<|im_start|>" in load_tokenizer(saved).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_the_assistant_only_validation_loss_is_the_mean_over_reply_tokens(tok, tmp_path):
    """The logged val loss equals transformers' loss on the same labels (its mean over trained tokens)."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    from smollm_ref.convert import to_transformers

    data = write_jsonl(tmp_path / "c.jsonl", conversations(10))
    result = train.train(
        TrainConfig.from_options(
            **chat_options(data, tmp_path / "run", max_steps=1, checkpoint_every=1, eval_every=1, val_fraction=0.3)
        )
    )
    from smollm_ref.weights import from_pretrained

    model = from_pretrained(checkpoint.find(tmp_path / "run")).eval()
    hf = to_transformers(model).eval()
    assert isinstance(hf, HFLlama) and isinstance(hf.config, LlamaConfig)
    val = chat_data(str(data), tok, 128, 0.3).val
    total = count = 0.0
    for i in range(len(val)):
        ids, labels, pos = val.batch([i])
        with torch.no_grad():
            out = hf(ids, position_ids=pos, labels=labels, use_cache=False)
        n = float((labels[:, 1:] != -100).sum())
        total, count = total + float(out.loss) * n, count + n
    assert result.val_loss == pytest.approx(total / count, rel=1e-5)


BAD_CHAT = {
    "no messages": ({"text": "hi"}, r"line 2: .*messages"),
    "messages not a list": ({"messages": "hi"}, r"line 2: .*list"),
    "unknown role": ({"messages": [{"role": "bot", "content": "hi"}]}, r"line 2: .*role"),
    "content not a string": (
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
        r"line 2: .*content",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHAT))
def test_bad_chat_records_are_one_line_errors(tmp_path, capsys, case):
    bad, message = BAD_CHAT[case]
    data = write_jsonl(tmp_path / "c.jsonl", [conversations(1)[0], bad, *conversations(3)])
    assert train.main(argv(chat_options(data, tmp_path / "run", data_format="chat"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and __import__("re").search(message, err[-1]), err[-1]
    assert not (tmp_path / "run").exists()


def test_no_assistant_reply_anywhere_and_no_chat_template_are_one_line_errors(tmp_path, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hello?"}]}] * 3)
    assert train.main(argv(chat_options(data, tmp_path / "run"))) == 2
    assert "holds no conversation with an assistant reply (3 records, 3 without one)" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "g.jsonl", conversations(4))
    opts = chat_options(
        good, tmp_path / "run", model_config=str(FORMAT1 / "step_000002" / "config.json"), tokenizer=str(FORMAT1 / "step_000002")
    )
    assert train.main(argv(opts)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "chat template" in line
