"""Chat data for fine-tuning: conversations encoded with the tokenizer's own chat template (loss on the
assistant's replies only, `smollm_ref.data.chat.encode`), a held-out tail for validation, and rows to train
on: packed (several conversations per row, positions restarting, no attention across them) or one
conversation per row, padded to the longest in its batch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from . import chat
from .sources import DataError, located_records, source_key
from .store import separator_id, tokenizer_fingerprint


@dataclass
class ChatRows:
    """Rows of (input_ids, labels[, position_ids]); `batch` makes (B, T) int64 tensors of them."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]] | None  # packed rows; None: one conversation per row, padded per batch
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def trained_tokens(self) -> int:
        return sum(sum(1 for label in labels[1:] if label != chat.IGNORE_INDEX) for labels in self.labels)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input_ids, labels, position_ids or None); labels align with input_ids (the loss shifts them)."""
        if self.position_ids is not None:
            return tuple(
                torch.tensor([rows[i] for i in indices], dtype=torch.int64)
                for rows in (self.input_ids, self.labels, self.position_ids)
            )
        width = max(len(self.input_ids[i]) for i in indices)
        ids = [self.input_ids[i] + [self.pad_id] * (width - len(self.input_ids[i])) for i in indices]
        labels = [self.labels[i] + [chat.IGNORE_INDEX] * (width - len(self.labels[i])) for i in indices]
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64), None


@dataclass
class ChatData:
    train: ChatRows
    val: ChatRows
    key: str  # which conversations, tokenizer and row layout: recorded in checkpoints
    counts: dict = field(default_factory=dict)  # conversations, skipped, truncated, dropped, train, val

    def describe(self) -> str:
        c = self.counts
        said = f"chat data: {c['conversations']:,} conversations, {c['train']:,} to train and {c['val']:,} held out"
        if c["skipped"]:
            said += f"; {c['skipped']:,} without an assistant reply skipped"
        if c["truncated"]:
            said += f"; {c['truncated']:,} longer than --seq-len cut to it"
        if c["dropped"]:
            said += f"; {c['dropped']:,} dropped (too long, or nothing left to train on)"
        layout = "packed into" if self.train.position_ids is not None else "one per row in"
        return said + f"; {layout} {len(self.train):,} rows, {self.train.trained_tokens():,} trained tokens (assistant replies)"


def encode_records(spec: str, tokenizer, max_tokens: int | None = None) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Every conversation of `spec` encoded (cut to `max_tokens`, see `chat.encode`), and how many were
    skipped for having no assistant reply. A malformed record is an error naming it (file and line for
    .jsonl); so is a set where no conversation has a reply."""
    encoded, skipped, seen = [], 0, 0
    for where, record in located_records(spec):
        seen += 1
        try:
            encoded.append(chat.encode(tokenizer, chat.messages_of(record), max_tokens=max_tokens))
        except chat.NoAssistantTurn:
            skipped += 1
        except chat.ChatError as e:
            raise DataError(f"{where}: {e}") from None
    if not encoded:
        raise DataError(
            f"{spec} holds no conversation with an assistant reply ({seen} records, {skipped} without one); nothing to fine-tune on"
        )
    return encoded, skipped


def chat_data(spec: str, tokenizer, seq_len: int, val_fraction: float, pack: bool = True, too_long: str = "truncate") -> ChatData:
    # one token more than a row holds: enough to tell a conversation that does not fit (cut or dropped below)
    encoded, skipped = encode_records(spec, tokenizer, max_tokens=seq_len + 1)
    n_val = max(1, round(len(encoded) * val_fraction)) if val_fraction > 0 and len(encoded) >= 2 else 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator_id(tokenizer)
    counts = {"conversations": len(encoded) + skipped, "skipped": skipped, "truncated": 0, "dropped": 0}
    parts = []
    for part in (encoded[: len(encoded) - n_val], encoded[len(encoded) - n_val :]):
        rows = _rows(part, seq_len, pad_id, pack, too_long, counts)
        parts.append(rows)
    train, val = parts
    if not len(train):
        raise DataError(f"{spec}: no conversation is left to train on after --seq-len {seq_len} (all dropped); raise --seq-len")
    counts.update(train=len(encoded) - n_val, val=n_val)
    h = hashlib.sha256(f"chat\0{source_key(spec)}\0{tokenizer_fingerprint(tokenizer)}\0{seq_len}\0{pack}\0{too_long}".encode())
    return ChatData(train, val, h.hexdigest()[:32], counts)


def _rows(examples, seq_len: int, pad_id: int, pack: bool, too_long: str, counts: dict) -> ChatRows:
    if pack:
        packed = chat.pack(examples, seq_len, pad_id, too_long=too_long)
        counts["truncated"] += packed.truncated
        counts["dropped"] += packed.dropped
        return ChatRows(
            [r.input_ids for r in packed.rows], [r.labels for r in packed.rows], [r.position_ids for r in packed.rows], pad_id
        )
    ids, labels = [], []
    for input_ids, conversation_labels in examples:
        if len(input_ids) > seq_len:
            if too_long == "drop":
                counts["dropped"] += 1
                continue
            input_ids, conversation_labels = input_ids[:seq_len], conversation_labels[:seq_len]
            counts["truncated"] += 1
        if all(label == chat.IGNORE_INDEX for label in conversation_labels[1:]):
            counts["dropped"] += 1
            continue
        ids.append(list(input_ids))
        labels.append(list(conversation_labels))
    return ChatRows(ids, labels, None, pad_id)
