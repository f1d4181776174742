"""Preference data for DPO: records of `prompt`, `chosen` and `rejected` in TRL's two formats, tokenised and cut
as TRL's `DPOTrainer` does, a held-out tail, and batches of chosen and rejected rows whose labels are the
responses' tokens only.

The two formats (TRL's "standard" and "conversational" preference records):

    strings         {"prompt": "...", "chosen": "...", "rejected": "..."}: plain text, no chat template; the
                    tokenizer's EOS is appended to a response that does not end with it
    conversations   {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]},
                    rendered with the tokenizer's chat template; or the prompt implicit: `chosen` and `rejected`
                    whole conversations that differ in their last (assistant) message only, their shared messages
                    being the prompt (TRL's `extract_prompt`; a string `prompt` beside them, as in
                    UltraFeedback, is not read)

Tokenising follows TRL 1.16's `DPOTrainer._prepare_dataset`: the prompt alone (a conversation with the generation
prompt) and prompt + chosen, prompt + rejected are each tokenised whole, and the responses start where the
prompt's ids stop agreeing with both (`common_prefix_length`), so every id is one of a whole rendering. Cutting:
`max_prompt_length` keeps the end of a longer prompt (TRL 0.x's `max_prompt_length`; TRL 1.x dropped it), then
prompt + response is cut to `max_length` keeping its start (TRL's `max_length` with its default
`truncation_mode="keep_start"`), which cuts the end of the response. A prompt that leaves no room for a response
is refused (TRL drops the pair without a word); so is a record TRL could not read as a pair, a pair whose chosen
and rejected are the same, and conversations whose chosen and rejected prompts differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..model import IGNORE_INDEX
from ..storage import shown
from .chat import ROLES, TOOL_KEYS
from .sources import (
    CHAT_DATA,
    DEFAULT_DATA,
    JSONL_SUFFIXES,
    PREFERENCE_DATA,
    DataError,
    iter_records,
    json_kind,
    located_records,
    source_key,
)
from .store import tokenizer_fingerprint

STRINGS, CONVERSATIONS = "strings", "conversations"


class PreferenceError(DataError):
    """A record that is not a usable preference pair; the message is one line naming what is wrong."""


class Pair(NamedTuple):
    prompt: list[int]
    chosen: list[int]  # the chosen response's ids, after the prompt
    rejected: list[int]


def _readable(spec: str) -> bool:
    return (
        spec == PREFERENCE_DATA
        or spec.startswith("hf:")
        or (Path(spec).expanduser().is_file() and Path(spec).suffix in JSONL_SUFFIXES)
    )


def preference_format(spec: str) -> str | None:
    """STRINGS or CONVERSATIONS when the first record of `spec` (`stdlib-preferences`, a .jsonl file or hf:...) holds `chosen` and
    `rejected`, as TRL tells its formats apart (by the first record); None for anything else."""
    if spec in (DEFAULT_DATA, CHAT_DATA) or not _readable(spec):
        return None
    first = next(iter_records(spec), None)
    if not (isinstance(first, Mapping) and "chosen" in first and "rejected" in first):
        return None
    return CONVERSATIONS if isinstance(first["chosen"], list) else STRINGS


def _check_turns(name: str, messages, roles: tuple[str, ...]) -> list:
    if not isinstance(messages, list) or not messages:
        raise PreferenceError(f"{name!r} must be a non-empty list of {{'role', 'content'}} messages, got {json_kind(messages)}")
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise PreferenceError(f"{where} must be an object with 'role' and 'content', got {shown(message)}")
        if any(message.get(key) for key in TOOL_KEYS):
            raise PreferenceError(f"{where} holds a tool call, which the chat template does not render; remove the record")
        if message["role"] not in roles:
            raise PreferenceError(f"{where} has the role {shown(message['role'])}; here it must be {' or '.join(roles)}")
        if not isinstance(message["content"], str):
            raise PreferenceError(f"{where} content must be a string, got {json_kind(message['content'])}")
    return messages


def _implicit_prompt(chosen, rejected) -> tuple[list, list, list]:
    """(prompt, [chosen reply], [rejected reply]) of two whole conversations that share every message but the last."""
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        _check_turns(name, conversation, ROLES)
        if conversation[-1]["role"] != "assistant" or len(conversation) < 2:
            raise PreferenceError(f"{name!r} must end with the assistant's reply after at least one message of the prompt")
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b), min(len(chosen), len(rejected)) - 1)
        raise PreferenceError(
            f"'chosen' and 'rejected' have different prompts (they differ at message {at}); a pair compares two replies "
            "to one prompt"
        )
    return chosen[:-1], chosen[-1:], rejected[-1:]


def pair_of(record) -> tuple[str, object, object, object]:
    """(format, prompt, chosen, rejected) of a record, checked: STRINGS with three strings, or CONVERSATIONS with
    message lists (an implicit prompt taken out of `chosen` and `rejected`). Raises PreferenceError."""
    if not isinstance(record, Mapping):
        raise PreferenceError(
            f"a preference record must be an object with 'prompt', 'chosen' and 'rejected', got {json_kind(record)}"
        )
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        keys = shown(", ".join(map(repr, record)) or "none", quote=False)
        raise PreferenceError(f"the record has no {' and no '.join(map(repr, missing))} (keys: {keys})")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        if isinstance(prompt, list):
            kind = CONVERSATIONS
            prompt = _check_turns("prompt", prompt, ROLES)
            chosen, rejected = (_check_turns(n, m, ("assistant",)) for n, m in (("chosen", chosen), ("rejected", rejected)))
        else:
            kind = CONVERSATIONS
            prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        kind = STRINGS
        if not isinstance(prompt, str):
            raise PreferenceError(f"a record of string responses needs a string 'prompt', got {json_kind(prompt)}")
    else:
        raise PreferenceError(
            f"'chosen' and 'rejected' must both be strings or both message lists, got {json_kind(chosen)} and {json_kind(rejected)}"
        )
    if chosen == rejected:
        raise PreferenceError("'chosen' and 'rejected' are the same: the pair prefers neither")
    return kind, prompt, chosen, rejected


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """How many leading ids two sequences share (TRL's `common_prefix_length`)."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def _ids(tokenizer, value, kind: str, generation_prompt: bool = False) -> list[int]:
    if kind == STRINGS:
        return list(tokenizer(value)["input_ids"])  # TRL: processing_class(text=...), with the tokenizer's own specials
    import jinja2  # transformers renders chat templates with jinja2

    try:
        out = tokenizer.apply_chat_template(value, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True)
    except jinja2.TemplateError as e:
        raise PreferenceError(f"the chat template refused the conversation: {' '.join(str(e).split())}") from e
    return list(out["input_ids"])


def encode(tokenizer, kind: str, prompt, chosen, rejected) -> Pair:
    """The ids of a checked pair (`pair_of`), as TRL 1.16's `DPOTrainer` tokenises it: string responses get the
    tokenizer's EOS; prompt, prompt + chosen and prompt + rejected are tokenised whole; the responses start
    where the prompt's ids stop agreeing with both. Raises PreferenceError for a response left with no id."""
    if kind == STRINGS:
        eos = tokenizer.eos_token
        if not eos:
            raise PreferenceError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token to end string responses with")
        chosen, rejected = (r if r.endswith(eos) else r + eos for r in (chosen, rejected))
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise PreferenceError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template; conversations need one")
        for message in (*prompt, *chosen, *rejected):
            # "<|im_end|>" typed inside a message is read as the control token: it would forge a turn
            token = next((t for t in getattr(tokenizer, "all_special_tokens", ()) if t and t in message["content"]), None)
            if token:
                raise PreferenceError(f"a {message['role']} message contains the control token {token!r}; refusing")
    prompt_ids = _ids(tokenizer, prompt, kind, generation_prompt=True)
    whole = [_ids(tokenizer, prompt + response, kind) for response in (chosen, rejected)]
    n = min(common_prefix_length(prompt_ids, ids) for ids in whole)
    pair = Pair(prompt_ids[:n], whole[0][n:], whole[1][n:])
    if not pair.chosen or not pair.rejected:
        raise PreferenceError(f"'{'chosen' if not pair.chosen else 'rejected'}' encodes to no token after the prompt")
    return pair


def cut(pair: Pair, max_length: int, max_prompt_length: int | None = None) -> tuple[Pair, bool, bool]:
    """(the pair cut, whether its prompt was, whether a response was). The prompt keeps its last
    `max_prompt_length` ids, then prompt + response keeps its first `max_length`. Raises PreferenceError when the
    prompt leaves no id of `max_length` for the responses."""
    prompt = pair.prompt
    prompt_cut = max_prompt_length is not None and len(prompt) > max_prompt_length
    if prompt_cut:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    if room < 1:
        raise PreferenceError(
            f"its prompt is {len(prompt):,} tokens, which leaves none of --seq-len {max_length} for the response; pass a "
            f"--max-prompt-length below {max_length} (a longer prompt keeps its end), a larger --seq-len, or remove the record"
        )
    chosen, rejected = pair.chosen[:room], pair.rejected[:room]
    return Pair(prompt, chosen, rejected), prompt_cut, len(chosen) + len(rejected) < len(pair.chosen) + len(pair.rejected)


@dataclass
class PreferenceRows:
    """Pairs of ids. `batch` lays B pairs out as TRL's collator does: 2B rows, the B chosen (prompt + chosen)
    then the B rejected, right-padded to the longest."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    pad_id: int
    # (pairs, 2) float32: the reference model's summed log-probabilities of each chosen and rejected response, kept
    # with the pairs once computed (`smollm_ref.train.objectives.preference`)
    reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input_ids (2B, T), labels (2B, T), reference (B, 2) or None). Labels align with input_ids (the loss
        shifts them) and are the response's ids, IGNORE_INDEX on the prompt and the padding."""
        indices = list(indices)
        ids, labels = [], []
        for responses in (self.chosen, self.rejected):
            for i in indices:
                ids.append(self.prompt[i] + responses[i])
                labels.append([IGNORE_INDEX] * len(self.prompt[i]) + responses[i])
        width = max(map(len, ids))
        ids = [row + [self.pad_id] * (width - len(row)) for row in ids]
        labels = [row + [IGNORE_INDEX] * (width - len(row)) for row in labels]
        reference = self.reference[indices] if self.reference is not None else None
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64), reference


@dataclass
class PreferenceData:
    train: PreferenceRows
    val: PreferenceRows
    key: str  # which records, tokenizer and cuts: recorded in checkpoints
    format: str  # STRINGS or CONVERSATIONS
    counts: dict = field(default_factory=dict)  # pairs, train, val, prompt_cut, response_cut

    def describe(self) -> str:
        c = self.counts
        said = f"preference data ({self.format}): {c['pairs']:,} pairs, {c['train']:,} to train and {c['val']:,} held out"
        if c["prompt_cut"]:
            said += f"; {c['prompt_cut']:,} prompts longer than --max-prompt-length cut to their end"
        if c["response_cut"]:
            said += f"; {c['response_cut']:,} pairs cut to --seq-len (the end of a response)"
        return said


def preference_data(
    spec: str, tokenizer, max_length: int, val_fraction: float, max_prompt_length: int | None = None
) -> PreferenceData:
    """Every pair of `spec` (`stdlib-preferences`, a .jsonl file or hf:...) encoded (`encode`) and cut (`cut`), the last
    `val_fraction` of them held out (at least one when there are two or more). A bad record is an error naming
    it (file and line for .jsonl); so is a spec that holds no pair, or records of both formats."""
    if not _readable(spec):
        raise DataError(
            f'preference data {spec} must be a .jsonl file of {{"prompt", "chosen", "rejected"}} records, hf:PATH with '
            f"those columns, or {PREFERENCE_DATA}"
        )
    pairs, counts, first = [], {"prompt_cut": 0, "response_cut": 0}, None
    for where, record in located_records(spec):
        try:
            kind, prompt, chosen, rejected = pair_of(record)
            first = first or kind
            if kind != first:
                raise PreferenceError(f"the record holds {kind} but the first record {first}; one format per data set")
            pair, prompt_cut, response_cut = cut(encode(tokenizer, kind, prompt, chosen, rejected), max_length, max_prompt_length)
        except PreferenceError as e:
            raise DataError(f"{where}: {e}") from None
        pairs.append(pair)
        counts["prompt_cut"] += prompt_cut
        counts["response_cut"] += response_cut
    if not pairs:
        raise DataError(f"{spec} holds no preference pair; nothing to train on")
    n_val = max(1, round(len(pairs) * val_fraction)) if val_fraction > 0 and len(pairs) >= 2 else 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, val = (
        PreferenceRows(*(list(column) for column in zip(*part)), pad_id) if part else PreferenceRows([], [], [], pad_id)
        for part in (pairs[: len(pairs) - n_val], pairs[len(pairs) - n_val :])
    )
    counts.update(pairs=len(pairs), train=len(train), val=len(val))
    h = hashlib.sha256(
        f"preference\0{source_key(spec)}\0{tokenizer_fingerprint(tokenizer)}\0{max_length}\0{max_prompt_length}".encode()
    )
    return PreferenceData(train, val, h.hexdigest()[:32], first, counts)
