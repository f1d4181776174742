"""What every objective gives the run (`Objective`), and the pieces they share."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ... import distributed


@dataclass(frozen=True)
class StepLoss:
    """How one optimizer step's loss is computed (`step.train_step`): each micro-batch's `loss_fn(*batch)`,
    divided by `divide_by`, summed over the micro-batches; `metrics` go into the step's record, and so does
    what `summary()` returns once the micro-batches have run (figures of the whole step, reduced over ranks:
    every rank calls it)."""

    loss_fn: Callable[..., torch.Tensor]
    divide_by: float
    metrics: dict
    summary: Callable[[], dict] | None = None


class Objective(Protocol):
    """A training objective, chosen once from the data (`objectives.choose`). The run and the loop call these
    and never ask which objective it is.

    Before the data is read (so bad options are refused before anything is built):
        chat_template          the model is talked to in its tokenizer's chat template: samples, benchmarks
                               (`--eval-tasks`) and `generate --chat`
        sample_at_start        a sample before the first step of a new run (a fine-tune's "before")
        fast_step_unsupported  why the fast step (`smollm_ref.fast.FastForward`) cannot train it; None: it can
        sample_prompt(option) -> str           what the samples continue or ask, from --sample-prompt
        sample_prompt_ids(prompt) -> (1, T) ids   its ids, to check that it fits the model's positions
        sample_prompt_name     what it is called in the error when it does not
    Reading the data:
        read(d, saved, vocab_size) -> data     `data.train` / `data.val`: rows with `len` and `batch(indices)`;
                                               `saved`: a resumed run's checkpoint state (`checkpoint_state` in it)
        budget                 tokens of --data read (recorded in checkpoints), or None
        rows                   what one row is, for messages ("rows", "windows of ... tokens", "pairs")
        sequences_per_row      model sequences one row trains on (a pair: 2), for tokens/s and MFU
        shown_metrics          the step figures of its own that the log line shows (validation: with val_)
        split_digest() -> dict the split by content: train and val rows and a checksum of the held-out ones
        announce() -> str | None, describe() -> str   lines for the start-up log
    Training:
        prepare(model, device, autocast, d) -> str | None   once the model is built, before the first step and
                               validation: what the objective takes from the initial model (a line for the log)
        checkpoint_state() -> dict   tensors and plain values a checkpoint keeps for the objective
        step_loss(model, fast_loss, micro_batches, d) -> StepLoss
        validate(model, batches, device, autocast, d) -> (loss, figures)   the validation loss over all ranks,
                               and the objective's own figures on the held-out rows ({} for none)
        sample(model, prompt, max_new_tokens, device, autocast, sampling) -> str   the text the log shows
    """

    name: str
    chat_template: bool
    sample_at_start: bool
    fast_step_unsupported: str | None
    sample_prompt_name: str
    data: object
    budget: int | None
    rows: str
    sequences_per_row: int
    shown_metrics: tuple[str, ...]

    def read(self, d: distributed.Dist, saved: dict | None, vocab_size: int): ...
    def split_digest(self) -> dict: ...
    def announce(self) -> str | None: ...
    def describe(self) -> str: ...
    def prepare(self, model, device, autocast, d: distributed.Dist) -> str | None: ...
    def checkpoint_state(self) -> dict: ...
    def sample_prompt(self, option: str) -> str: ...
    def sample_prompt_ids(self, prompt: str) -> torch.Tensor: ...
    def step_loss(self, model, fast_loss, micro_batches: list, d: distributed.Dist) -> StepLoss: ...
    def validate(self, model, batches: list[list[int]], device, autocast, d: distributed.Dist) -> tuple[float, dict]: ...
    def sample(self, model, prompt: str, max_new_tokens: int, device, autocast, sampling) -> str: ...


def split_digest(n_train: int, n_val: int, held_out: Iterable) -> dict:
    """The split by content: the number of training and held-out rows and a checksum of the held-out tokens
    (`held_out`: int arrays or lists, hashed as int64, each followed by `sep`). Saved in checkpoints, so a resume
    on other data (or another split of it) is refused whatever the store's key says (a moved or touched corpus
    has another key and the same tokens)."""
    h = hashlib.sha256()
    for chunk, sep in held_out:
        h.update(np.asarray(chunk, dtype=np.int64).tobytes() + sep)
    return {"train": n_train, "val": n_val, "val_sha256": h.hexdigest()[:32]}


def row_digests(rows, indices: list[int]) -> bytes:
    """The SHA-256 of each of `rows`' rows `indices`, 32 bytes each, concatenated in order: a digest of the row's
    integer tensors (token ids, labels, positions) as `rows.batch([i])` gives them, so no row is padded to
    another's length. Rows by content, the same whichever process and micro-batch reads them."""
    out = []
    for i in indices:
        h = hashlib.sha256()
        for t in rows.batch([i]):
            if t is not None and not t.is_floating_point():
                h.update(t.to(torch.int64).numpy().tobytes())
        out.append(h.digest())
    return b"".join(out)


@torch.no_grad()
def in_eval_mode(model, fn):
    """`fn()` with `model` in eval mode and no gradients; its training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was_training)
