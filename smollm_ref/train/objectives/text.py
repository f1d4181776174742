"""Language modelling on text (pretraining, continued pretraining): the next-token loss on every token of
windows of --seq-len + 1 tokens cut from a token store of --data."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ... import data, distributed
from ..logger import say
from ..options import DataOptions, TrainError
from ..samples import Sampling, draw, sample_prompt_text
from .base import StepLoss, in_eval_mode, split_digest


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; `targets` are the inputs shifted by one, so every position predicts.
    Logits upcast to float32 before the softmax, as transformers' loss does."""
    logits = model(inputs).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def evaluate(model, windows: data.Windows, batches: list[list[int]], device, autocast) -> torch.Tensor:
    """Mean loss over the given batches of validation windows (this rank's share), in eval mode."""

    def losses():
        out = []
        for indices in batches:
            inputs, targets = (t.to(device) for t in windows.batch(indices))
            with autocast:
                out.append(lm_loss(model, inputs, targets))
        return torch.stack(out).mean()

    return in_eval_mode(model, losses)


def text_prompt_ids(tokenizer, prompt: str, stop_id: int | None) -> torch.Tensor:
    """(1, T) ids of a text sample's prompt (`sample_prompt_text`); an empty one starts from `stop_id`."""
    ids = tokenizer(sample_prompt_text(prompt), add_special_tokens=False, return_tensors="pt").input_ids
    return ids if ids.shape[1] else torch.tensor([[stop_id or 0]])


def sample_text(
    model, tokenizer, prompt: str, max_new_tokens: int, device, autocast, sampling: Sampling | None = None,
    stop_id: int | None = None,
) -> str:  # fmt: skip
    """A sample continuing `prompt` (without its trailing spaces: `sample_prompt_text`), up to the document
    separator `stop_id`, drawn as `sampling` says (default temperature 0.8, top-k 50, seed 0)."""
    ids = text_prompt_ids(tokenizer, prompt, stop_id).to(device)
    new = draw(model, ids, max_new_tokens, autocast, sampling or Sampling(), stop_id)
    return tokenizer.decode(new, skip_special_tokens=False)


@dataclass
class TokenData:
    train: data.Windows
    val: data.Windows
    key: str  # the token store's key, recorded in checkpoints
    budget: int | None  # the token budget the store was read to
    train_tokens: int
    val_tokens: int


def data_budget(options: DataOptions, max_steps: int, world_size: int, saved: dict | None) -> int | None:
    """How many tokens of --data to read: --data-tokens; else what a resumed run read; else, for a streamed
    hf: spec, what this run needs (every one of its `max_steps` steps' windows plus the validation share);
    else everything."""
    if options.data_tokens is not None:
        return options.data_tokens
    if saved is not None:
        return saved.get("data_budget")
    if not options.data.startswith("hf:"):
        return None
    train_tokens = max_steps * world_size * options.batch_size * options.grad_accum * options.seq_len + 1
    return math.ceil(train_tokens / (1 - options.val_fraction))


def token_data(
    options: DataOptions, tokenizer, d: distributed.Dist, budget: int | None, vocab_size: int, progress: bool
) -> TokenData:
    """The token store of --data (a prepared store as is; any other spec prepared once into the cache by
    each node's first rank while the others wait: a node's cache may be its own, and on a shared one the
    store's lock makes the later ones wait and open it), split into training and validation windows of --seq-len + 1.
    A store written earlier is verified, and refused (`TrainError`) if it holds a token id the model's
    `vocab_size` embeddings lack; one prepared just now holds only the tokenizer's ids, which the caller
    has checked against the model. `progress`: a bar while it is prepared."""
    fresh = False  # prepared just now: its shards were hashed as they were written
    if data.is_store(options.data):
        store = data.Store(options.data)
        store.check_tokenizer(tokenizer)
    else:
        from ...storage import cache_dir

        directory = data.store_dir(options.data, tokenizer, cache_dir() / "tokens", options.text_field, budget)
        if d.local_rank == 0:
            fresh = not (directory / data.store.INDEX).is_file()
            if fresh and budget is not None:
                say(f"streaming {options.data} until {budget / 1e6:.1f} M tokens")
            store = data.prepare_or_open(
                directory,
                options.data,
                tokenizer,
                text_field=options.text_field,
                budget=budget,
                workers=_workers(options.data),
                progress=progress,
            )
        distributed.barrier(d)
        if d.local_rank != 0:
            store = data.Store(directory)
    if d.local_rank == 0 and not fresh:
        top = store.verify()  # a store written earlier, or elsewhere: every shard against its checksum
        if top >= vocab_size:  # its index may predate the vocabulary size, or name another tokenizer's
            raise TrainError(
                f"token store {store.dir} holds token id {top:,}, but the model's vocabulary has {vocab_size:,} tokens "
                f"(ids 0 to {vocab_size - 1:,}); prepare the store again"
            )
    split = data.split_tokens(store.tokens(), options.seq_len, options.val_fraction, key=store.key)
    return TokenData(
        data.Windows(split.train, options.seq_len),
        data.Windows(split.val, options.seq_len),
        split.key,
        budget,
        len(split.train),
        len(split.val),
    )


def _workers(spec: str) -> int:
    """All usable cores, except for a small local corpus, where starting worker processes costs more than it
    saves."""
    path = Path(spec).expanduser()
    if path.is_file() and path.stat().st_size < 16 << 20:
        return 1
    return data.tokenise.usable_cores()


class TextObjective:
    """Next-token prediction on every token: (inputs, targets) windows, each micro-batch's mean loss (every
    micro-batch trains the same number of tokens), samples continuing --sample-prompt up to the document
    separator."""

    name = "text"
    sequences_per_row = 1
    shown_metrics = ()
    chat_template = False
    sample_at_start = False
    fast_step_unsupported = None
    sample_prompt_name = "--sample-prompt"

    def __init__(self, options: DataOptions, tokenizer, *, max_steps: int, progress: bool):
        self.options, self.tokenizer = options, tokenizer
        self.max_steps, self.progress = max_steps, progress  # the run's length sizes a streamed corpus (`data_budget`)
        self.data: TokenData | None = None

    @property
    def rows(self) -> str:
        return f"windows of --seq-len + 1 = {self.options.seq_len + 1} tokens"

    @property
    def budget(self) -> int | None:
        return self.data.budget

    def read(self, d: distributed.Dist, saved: dict | None, vocab_size: int) -> TokenData:
        budget = data_budget(self.options, self.max_steps, d.world_size, saved)
        self.data = token_data(self.options, self.tokenizer, d, budget, vocab_size, self.progress)
        return self.data

    def split_digest(self) -> dict:
        return split_digest(len(self.data.train), len(self.data.val), [(self.data.val.tokens, b"")])

    def announce(self) -> str | None:
        return None

    def describe(self) -> str:
        d = self.data
        return f"train {d.train_tokens:,} tokens ({len(d.train):,} sequences), val {d.val_tokens:,}"

    def prepare(self, model, device, autocast, d: distributed.Dist) -> str | None:
        return None

    def checkpoint_state(self) -> dict:
        return {}

    def sample_prompt(self, option: str) -> str:
        return sample_prompt_text(option)

    def sample_prompt_ids(self, prompt: str) -> torch.Tensor:
        return text_prompt_ids(self.tokenizer, prompt, 0)

    def step_loss(self, model, fast_loss, micro_batches: list, d: distributed.Dist) -> StepLoss:
        # every micro-batch trains the same number of tokens, so the step's mean is the mean of their means
        return StepLoss(fast_loss or functools.partial(lm_loss, model), len(micro_batches), {})

    def validate(self, model, batches: list[list[int]], device, autocast, d: distributed.Dist) -> tuple[float, dict]:
        return float(distributed.mean(d, evaluate(model, self.data.val, batches, device, autocast))), {}

    def sample(self, model, prompt: str, max_new_tokens: int, device, autocast, sampling: Sampling) -> str:
        stop_id = data.separator_id(self.tokenizer)
        return prompt + sample_text(model, self.tokenizer, prompt, max_new_tokens, device, autocast, sampling, stop_id)
