"""Chat data for supervised fine-tuning: a conversation as token ids and labels that train on the assistant only,
and several conversations packed into rows of a fixed length.

A conversation is a list of `{"role", "content"}` messages (roles system / user / assistant: the OpenAI / TRL
format). `encode` renders it once with the tokenizer's own chat template and labels exactly the tokens of each
assistant message's content and the token that closes its turn (`<|im_end|>` for SmolLM2); everything else
(system, user, role headers, the newline after `<|im_end|>`) is -100, which the loss ignores.

Where the assistant's text is, is found by rendering prefixes of the conversation: the prefix before an
assistant message with the generation prompt ends where its content starts. This works for templates without
`{% generation %}` markers (SmolLM2's has none, and `apply_chat_template(return_assistant_tokens_mask=True)`
then silently returns a mask of zeros). A template whose prefix renderings are not prefixes of the whole
rendering is refused (`ChatError`), never "solved" by training on every token. Each prefix costs its length
to render, so all of them cost the square of the conversation's; `encode(..., max_tokens=N)` renders only
those before the N-th token, bounding the work for a conversation cut to a row of N tokens.

Labels are aligned with `input_ids` (labels[t] is input_ids[t] or -100); the loss shifts them, as transformers
does: the logits at t are scored against labels[t + 1] (`smollm_ref.model.causal_lm_loss`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from ..model import IGNORE_INDEX
from ..storage import shown

ROLES = ("system", "user", "assistant")
TOOL_KEYS = ("tool_calls", "function_call")  # OpenAI's tool calls, current and older


class ChatError(ValueError):
    """A conversation, record or tokenizer that cannot be encoded; the message is one line naming what is wrong."""


class NoAssistantTurn(ChatError):
    """A valid conversation with nothing to train on; the trainer counts and skips these."""


def messages_of(record) -> list:
    """The `messages` of a data record (a JSON object), checked as `check_messages` does."""
    if not isinstance(record, Mapping):
        raise ChatError(f"a chat record must be an object with a 'messages' list, got {type(record).__name__}")
    if "messages" not in record:
        raise ChatError(f"the record has no 'messages' (keys: {shown(', '.join(map(repr, record)) or 'none', quote=False)})")
    return check_messages(record["messages"])


def check_messages(messages) -> list:
    """`messages` itself if it is a list of `{"role", "content"}` with known roles, string contents and at
    least one assistant message; otherwise ChatError (NoAssistantTurn for the last)."""
    if not isinstance(messages, list):
        raise ChatError(f"'messages' must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    if not messages:
        raise NoAssistantTurn("'messages' is empty: no assistant turn to train on")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatError(f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
        # Checked first: an OpenAI tool call has a null or empty content, which the template would render, and
        # the trainer train, as an empty reply. (A null here is a parquet column other rows fill, not a call.)
        calls = [key for key in TOOL_KEYS if message.get(key)]
        if calls:
            raise ChatError(
                f"messages[{i}] holds {calls[0]!r}, which the chat template does not render (it would be trained as an "
                "empty reply); remove tool-calling conversations from the data"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ChatError(f"messages[{i}] has no {key!r}")
        role = message["role"]
        if role not in ROLES:
            raise ChatError(f"messages[{i}] has an unknown role {shown(role)} (allowed: {', '.join(ROLES)})")
        if not isinstance(message["content"], str):
            raise ChatError(f"messages[{i}] ({role}) content must be a string, got {type(message['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise NoAssistantTurn(f"no assistant turn in {len(messages)} message(s): nothing to train on")
    return messages


def _render(tokenizer, messages: list, generation_prompt: bool) -> str:
    import jinja2  # transformers renders chat templates with jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as e:
        raise ChatError(f"the chat template refused the conversation: {' '.join(str(e).split())}") from e


def _assistant_spans(tokenizer, messages: list, whole: str, horizon: int | None = None) -> list[tuple[int, int]]:
    """(start, end) character span of each assistant message's content in `whole`; `end` is the first character
    of what closes the turn. With `horizon`, only the spans starting before that character: the prefixes after
    it are not rendered (each rendering costs its length, so rendering them all grows with the square of the
    conversation's length)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:  # transformers renders no empty conversation, so this turn's header cannot be found
            raise ChatError("messages[0] is the assistant's: a conversation must open with a system or user message")
        head = _render(tokenizer, messages[:i], generation_prompt=True)  # ... <|im_start|>assistant\n
        if not whole.startswith(head):
            raise _not_a_prefix(f"messages[:{i}] with the generation prompt", i)
        if horizon is not None and len(head) >= horizon:
            break  # this reply, and every later one (their headers are longer), starts past the kept tokens
        turn = _render(tokenizer, messages[: i + 1], generation_prompt=False)  # ... content<|im_end|>\n
        if not whole.startswith(turn):
            raise _not_a_prefix(f"messages[:{i + 1}]", i)
        start, end = len(head), len(head) + len(message["content"])
        if whole[start:end] != message["content"]:
            raise ChatError(
                f"the chat template does not write messages[{i}] (assistant) verbatim after its header "
                "(does it strip or rewrite content?); refusing rather than guessing its tokens"
            )
        if end >= len(turn):
            raise ChatError(
                f"the chat template closes messages[{i}] (assistant) with nothing, so there is no end-of-turn token "
                "to train; refusing"
            )
        spans.append((start, end))
    return spans


def _not_a_prefix(which: str, i: int) -> ChatError:
    return ChatError(
        f"the chat template's rendering of {which} is not a prefix of the whole conversation's, so the "
        f"assistant's tokens cannot be told apart (messages[{i}]); refusing rather than training on every token"
    )


def encode(tokenizer, messages, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: the ids of the tokenizer's chat template rendered once (exactly
    `tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]`), and labels equal to them on each
    assistant message's content and the token that closes its turn, -100 elsewhere.

    The whole rendering is tokenised once and character spans mapped to tokens through the offsets, so the
    ids are those of the full rendering, never pieces tokenised apart. A token is trained if it carries any
    character of an assistant's content, or the first character after it (the closing token). Byte-level BPE
    can merge the header's last newline with whitespace that starts the content ("\\n" + " x" -> "\\n ", " x"):
    that one token is trained, header newline included, so that no character of the reply goes untrained.

    `max_tokens` (>= 1): return only the first `max_tokens` ids and labels, exactly those of the whole
    encoding; the replies past them are not looked for, so the work is bounded by `max_tokens` however long
    the conversation (a caller cutting rows to seq_len passes seq_len + 1 to learn whether it was longer).
    Raises ChatError (NoAssistantTurn when there is no assistant message) for what cannot be encoded.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a whole number >= 1 or None, got {max_tokens!r}")
    check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise ChatError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template; chat data needs one")
    for i, message in enumerate(messages):
        # "<|im_end|>" typed inside a message is read as the control token: a reply would be trained to end
        # mid-way (and a user could forge turns)
        for token in getattr(tokenizer, "all_special_tokens", ()):
            if token and token in message["content"]:
                raise ChatError(f"messages[{i}] ({message['role']}) contains the control token {token!r}; refusing")
    whole = _render(tokenizer, messages, generation_prompt=False)
    try:
        encoding = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
        raise ChatError(f"chat data needs a fast tokenizer (with offsets); {type(tokenizer).__name__} has none") from e
    input_ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    horizon = None
    if max_tokens is not None and len(input_ids) > max_tokens:
        input_ids, offsets = input_ids[:max_tokens], offsets[:max_tokens]
        horizon = max(e for _, e in offsets)  # a reply starting at or after it labels none of the kept tokens
    spans = _assistant_spans(tokenizer, messages, whole, horizon)
    labels = [IGNORE_INDEX] * len(input_ids)
    span = 0
    for k, (s, e) in enumerate(offsets):
        while span < len(spans) and s > spans[span][1]:  # past this span's closing character
            span += 1
        if span == len(spans):
            break
        start, end = spans[span]
        if e > start and (s < end or s <= end < e):  # overlaps the content, or holds the closing character
            labels[k] = input_ids[k]
    return input_ids, labels


class PackedRow(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]  # restart at 0 with each conversation and with the padding


class Packed(NamedTuple):
    rows: list[PackedRow]
    truncated: int  # conversations longer than a row, cut to its length
    dropped: int  # conversations with no trained label left (after truncation), or too long with too_long="drop"


def pack(
    examples: Iterable[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int, too_long: str = "truncate"
) -> Packed:
    """Conversations `(input_ids, labels)` packed into rows of exactly `seq_len` tokens, first fit in order.

    Each conversation keeps its own position ids 0, 1, ... and its first label is set to -100: in a row, the
    token before it belongs to another conversation, which must not be trained to predict it (alone, that
    label is never scored anyway). The tail of a row is padding (`pad_id`, label -100) with position ids of its
    own 0, 1, ..., so the model sees a separate sequence there (`smollm_ref.model.packed_causal_mask`): give
    the model `position_ids` and no attention mask. A conversation longer than `seq_len` is cut to it
    (`too_long="truncate"`) or left out (`"drop"`); one with no trained label left is left out.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")
    rows: list[tuple[list[int], list[int], list[int]]] = []
    truncated = dropped = 0
    for input_ids, labels in examples:
        if len(input_ids) != len(labels):
            raise ValueError(f"input_ids and labels differ in length ({len(input_ids)} != {len(labels)})")
        if len(input_ids) > seq_len:
            if too_long == "drop":
                dropped += 1
                continue
            input_ids, labels = input_ids[:seq_len], labels[:seq_len]
            truncated += 1
        labels = [IGNORE_INDEX, *labels[1:]] if labels else []
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        row = next((r for r in rows if len(r[0]) + len(input_ids) <= seq_len), None)
        if row is None:
            row = ([], [], [])
            rows.append(row)
        row[0].extend(input_ids)
        row[1].extend(labels)
        row[2].extend(range(len(input_ids)))
    packed = []
    for ids, labels, positions in rows:
        pad = seq_len - len(ids)
        packed.append(PackedRow(ids + [pad_id] * pad, labels + [IGNORE_INDEX] * pad, positions + list(range(pad))))
    return Packed(packed, truncated, dropped)
