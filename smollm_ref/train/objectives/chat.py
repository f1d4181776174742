"""Chat supervised fine-tuning: the loss on the assistant's replies only, conversations rendered with the
tokenizer's chat template (`smollm_ref.data.chat`), packed or padded into rows (`smollm_ref.data.conversations`)."""

from __future__ import annotations

import functools

import torch

from ... import distributed
from ...data.chat import IGNORE_INDEX
from ...data.conversations import ChatData
from ...model import causal_lm_loss_sum
from ..options import DataOptions, LogOptions
from ..samples import Sampling, draw, sample_prompt_text
from .base import StepLoss, in_eval_mode, split_digest

CHAT_SAMPLE_QUESTION = "What does the Python module `json` do?"  # when --sample-prompt is left at its text default


def sft_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The summed next-token loss over the trained (label != IGNORE_INDEX) tokens of a chat batch; packed rows
    pass their restarting `position_ids` (and no attention mask), so no conversation attends to another."""
    logits = model(input_ids, position_ids=position_ids).logits
    return causal_lm_loss_sum(logits, labels)[0]


def trained_tokens(micro_batches) -> torch.Tensor:
    """How many tokens a chat step trains on (labels shifted by one, as the loss reads them)."""
    return sum((labels[:, 1:] != IGNORE_INDEX).sum() for _, labels, _ in micro_batches)


def evaluate_chat(model, rows, batches: list[list[int]], device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, trained tokens) over the given batches of validation rows (this rank's share), in eval
    mode: the assistant-only validation loss is their ratio over all ranks."""

    def sums():
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        for indices in batches:
            batch = tuple(t.to(device) if t is not None else None for t in rows.batch(indices))
            with autocast:
                total += sft_loss_sum(model, *batch).float()
            count += trained_tokens([batch])
        return total, count

    return in_eval_mode(model, sums)


def chat_prompt_ids(tokenizer, question: str) -> torch.Tensor:
    """(1, T) ids of a chat sample's prompt: the tokenizer's chat template with the generation prompt."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt")
    return ids["input_ids"] if hasattr(ids, "keys") else ids


def sample_chat(model, tokenizer, question: str, max_new_tokens: int, device, autocast, sampling: Sampling | None = None) -> str:
    """A chat reply to `question` (`chat_prompt_ids`), drawn as `sampling` says, up to the token that closes the
    assistant's turn."""
    ids = chat_prompt_ids(tokenizer, question).to(device)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    return tokenizer.decode(draw(model, ids, max_new_tokens, autocast, sampling or Sampling(), end), skip_special_tokens=True)


def chat_data(options: DataOptions, tokenizer) -> ChatData:
    """Conversations encoded with the tokenizer's chat template (every rank encodes them: a chat set is small)."""
    from ...data.conversations import chat_data

    return chat_data(options.data, tokenizer, options.seq_len, options.val_fraction, pack=options.pack, too_long=options.too_long)


class ChatObjective:
    """Supervised fine-tuning on conversations: rows of (input_ids, labels, position_ids or None), the loss
    summed over a step's trained tokens (all micro-batches and ranks) and divided once by their number, so a
    reply counts the same whichever micro-batch it lands in; samples answer a question in the chat template."""

    name = "chat"
    sequences_per_row = 1
    shown_metrics = ()
    chat_template = True
    sample_at_start = True  # a reply before fine-tuning, to compare with the ones after
    fast_step_unsupported = "the fast step does not take chat rows yet"
    sample_prompt_name = "the chat sample's prompt (the question in the chat template)"
    rows = "rows"
    budget = None  # every conversation is read

    def __init__(self, options: DataOptions, tokenizer):
        self.options, self.tokenizer = options, tokenizer
        self.data: ChatData | None = None

    def read(self, d: distributed.Dist, saved: dict | None, vocab_size: int) -> ChatData:
        self.data = chat_data(self.options, self.tokenizer)
        return self.data

    def split_digest(self) -> dict:
        val = self.data.val
        rows = [(row, b"|") for part in (val.input_ids, val.labels, val.position_ids or []) for row in part]
        return split_digest(len(self.data.train), len(val), rows)

    def announce(self) -> str | None:
        return self.data.describe()

    def describe(self) -> str:
        return f"train {len(self.data.train):,} rows, val {len(self.data.val):,}"

    def prepare(self, model, device, autocast, d: distributed.Dist) -> str | None:
        return None

    def checkpoint_state(self) -> dict:
        return {}

    def sample_prompt(self, option: str) -> str:
        """The question the samples ask: --sample-prompt, or a built-in one when it is left at its text default."""
        prompt = sample_prompt_text(option)
        return CHAT_SAMPLE_QUESTION if prompt == LogOptions.sample_prompt else prompt

    def sample_prompt_ids(self, prompt: str) -> torch.Tensor:
        return chat_prompt_ids(self.tokenizer, prompt)

    def step_loss(self, model, fast_loss, micro_batches: list, d: distributed.Dist) -> StepLoss:
        trained = distributed.mean(d, trained_tokens(micro_batches).float())  # all ranks' count / ranks: DDP averages
        return StepLoss(
            functools.partial(sft_loss_sum, model), float(trained), {"trained_tokens": round(float(trained) * d.world_size)}
        )

    def validate(self, model, batches: list[list[int]], device, autocast, d: distributed.Dist) -> tuple[float, dict]:
        # assistant-only: summed over every rank's trained tokens, then divided once
        total, count = evaluate_chat(model, self.data.val, batches, device, autocast)
        return float(distributed.mean(d, total)) / max(float(distributed.mean(d, count.float())), 1e-9), {}

    def sample(self, model, prompt: str, max_new_tokens: int, device, autocast, sampling: Sampling) -> str:
        reply = sample_chat(model, self.tokenizer, prompt, max_new_tokens, device, autocast, sampling)
        return f"user: {prompt}\nassistant: {reply}"
