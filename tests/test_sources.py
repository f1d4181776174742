"""Every command that takes a model takes every source the others take (one resolver, `weights.resolve`):
a training run, its checkpoints folder, one checkpoint, a transformers directory; and the trainer's closing
lines name a `generate` command that runs."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from parity import sources as parity_sources
from smollm_ref import checkpoint, summary
from smollm_ref.demo import DemoError, load_demo
from smollm_ref.demo import main as demo_main
from smollm_ref.generate import generate
from smollm_ref.generate import main as generate_main
from smollm_ref.model import LlamaForCausalLM
from smollm_ref.tokenizer import load_tokenizer
from smollm_ref.train.loop import TrainResult, closing_lines
from smollm_ref.weights import SourceError, from_pretrained, resolve, save_pretrained

from .conftest import tiny_config

RUN_TOKEN = "<|this-run|>"  # in the run's tokenizer only: says which tokenizer a command loaded


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(vocab_size=49160, bos_token_id=0, eos_token_id=2)).eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory, model) -> Path:
    """A training run as the trainer leaves it: checkpoints/step_NNNNNN with the run's own tokenizer."""
    tok = load_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [RUN_TOKEN]})
    run = tmp_path_factory.mktemp("run")

    def files(directory: Path) -> None:
        save_pretrained(model, directory, tok)
        torch.save({"step": 3}, directory / checkpoint.STATE)

    checkpoint.write(checkpoint.checkpoints_root(run), 3, files)
    return run


SOURCES = {
    "run": lambda run: run,
    "checkpoints folder": lambda run: run / "checkpoints",
    "step checkpoint": lambda run: run / "checkpoints" / "step_000003",
    "transformers directory": lambda run: run / "checkpoints" / "step_000003",  # replaced by an export below
}


@pytest.fixture(params=list(SOURCES))
def source(request, run, tmp_path, model) -> str:
    if request.param == "transformers directory":
        return str(save_pretrained(model, tmp_path / "export", load_tokenizer(run)))
    return str(SOURCES[request.param](run))


def test_resolve_names_a_run_and_its_checkpoints(run, source):
    kind, _ = resolve(source)
    assert kind == ("dir" if source.endswith("export") else "checkpoint")


def test_from_pretrained_and_load_tokenizer_take_every_source(run, source, model):
    loaded = from_pretrained(source)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    tok = load_tokenizer(source)
    assert RUN_TOKEN in tok.get_vocab()  # the run's own tokenizer, not a fallback


def test_generate_command_takes_every_source(source, capsys):
    assert generate_main(["--model", source, "--prompt", "Hello", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hello") and "3 tokens" in err and "note:" not in err


def test_generate_command_on_a_run_equals_generate_on_its_model(run, model, capsys):
    assert generate_main(["--model", str(run), "--prompt", "Hello world", "--max-new-tokens", "5"]) == 0
    tok = load_tokenizer(run)
    ids = tok("Hello world", return_tensors="pt").input_ids
    new = generate(model, ids, 5, eos_token_id=[])[0, ids.shape[1] :].tolist()
    expected = "Hello world" + tok.decode(new, skip_special_tokens=True)
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("flag", ["--model", "--checkpoint"])
def test_demo_takes_every_source_under_either_flag(source, flag):
    demo = load_demo(**{flag.lstrip("-"): source})
    assert RUN_TOKEN in demo.tokenizer.get_vocab() and not demo.notes
    if not source.endswith("export"):
        assert demo.step == 3 and "checkpoint step 3" in demo.description()


def test_summary_takes_every_source(source, capsys):
    assert summary.main(["--model", source, "--depth", "1"]) == 0
    assert f"smollm_ref parameters (tied weights once): {sum(p.numel() for p in from_pretrained(source).parameters()):,}" in (
        capsys.readouterr().out
    )


def test_parity_loads_transformers_from_every_source(source, model):
    theirs = parity_sources.load_transformers(source)
    ids = torch.randint(3, 1000, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits)
    assert RUN_TOKEN in parity_sources.tokenizer_for(source)[0].get_vocab()


def test_a_run_without_a_checkpoint_is_one_line_everywhere(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for load in (from_pretrained, load_tokenizer):
        with pytest.raises(ValueError, match="holds no checkpoint"):
            load(run)
    assert generate_main(["--model", str(run), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "holds no checkpoint" in err[0]
    with pytest.raises(DemoError, match="holds no checkpoint"):
        load_demo(model=str(run))
    assert demo_main(["--model", str(run), "--port", "1"]) == 2


def test_a_source_that_is_not_a_path_is_refused():
    with pytest.raises(SourceError, match="not NoneType"):
        resolve(None)
    with pytest.raises(DemoError, match="model must be a model source"):
        load_demo(model=3)


def test_a_gguf_without_a_tokenizer_says_so(tmp_path):
    from .test_untrusted import _tiny_gguf

    path = _tiny_gguf(tmp_path / "tiny.gguf", block_count=2)
    with pytest.raises(SourceError, match="has no tokenizer") as info:
        load_tokenizer(path)
    assert "\n" not in str(info.value)


def test_closing_lines_name_a_generate_command_that_runs(run, capsys):
    lines = closing_lines(TrainResult(3, 1.5, None, run / "checkpoints" / "step_000003", run))
    argv = next(shlex.split(line) for line in lines.splitlines() if "smollm_ref.generate" in line)
    argv = argv[argv.index("python") :]
    assert argv[:3] == ["python", "-m", "smollm_ref.generate"] and argv[argv.index("--model") + 1] == str(run)
    assert generate_main(argv[3:] + ["--max-new-tokens", "2"]) == 0
    assert "2 tokens" in capsys.readouterr().err


def test_a_chat_runs_closing_lines_talk_to_it_with_chat(run):
    """`generate --chat` renders the chat template a chat run was trained on; plain text would not."""
    for chat in (False, True):
        lines = closing_lines(TrainResult(3, 1.5, None, run / "checkpoints" / "step_000003", run, chat=chat))
        (line,) = [line for line in lines.splitlines() if "smollm_ref.generate" in line]
        assert ("--chat" in shlex.split(line)) == chat, line


def test_a_fifo_or_device_is_refused_as_a_source_or_tokenizer_file_without_reading(tmp_path, run):
    import os

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match="not a regular file or a directory"):
        resolve(fifo)
    with pytest.raises(SourceError, match="not a regular file or a directory"):
        load_tokenizer("/dev/zero")
    export = save_pretrained(LlamaForCausalLM(tiny_config()), tmp_path / "export", load_tokenizer(run))
    (export / "tokenizer_config.json").unlink()
    os.mkfifo(export / "tokenizer_config.json")  # AutoTokenizer would block on it forever
    with pytest.raises(SourceError, match="tokenizer_config.json is not a regular file"):
        load_tokenizer(export)
