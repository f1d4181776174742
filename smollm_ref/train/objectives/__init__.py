"""Training objectives, one object each, chosen once from the data (`choose`); the run and the loop call the
objective (`Objective`) and never ask which one it is.

    text   TextObjective   next-token loss on every token of token-store windows (pretraining)
    chat   ChatObjective   loss on the assistant's replies of chat-template conversations (SFT)
"""

from __future__ import annotations

from ... import data
from ..options import DataOptions
from .base import Objective, StepLoss
from .chat import CHAT_SAMPLE_QUESTION, ChatObjective, sft_loss_sum, trained_tokens
from .text import TextObjective, lm_loss

__all__ = [
    "CHAT_SAMPLE_QUESTION",
    "ChatObjective",
    "Objective",
    "StepLoss",
    "TextObjective",
    "choose",
    "lm_loss",
    "sft_loss_sum",
    "trained_tokens",
]


def choose(options: DataOptions, tokenizer, *, max_steps: int, progress: bool) -> Objective:
    """The objective of --data-format (`options`: the run's `cfg.data`): chat for records of `messages` (auto: when
    the data holds them), else text. `max_steps` (--max-steps) sizes what a streamed text corpus reads;
    `progress` shows a bar while text data is prepared."""
    chat = options.data_format == "chat" if options.data_format != "auto" else data.looks_like_chat(options.data)
    if chat:
        return ChatObjective(options, tokenizer)
    return TextObjective(options, tokenizer, max_steps=max_steps, progress=progress)
