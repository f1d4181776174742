"""Training objectives, one object each, chosen once from the data (`choose`); the run and the loop call the
objective (`Objective`) and never ask which one it is.

    text        TextObjective         next-token loss on every token of token-store windows (pretraining)
    chat        ChatObjective         loss on the assistant's replies of chat-template conversations (SFT)
    preference  PreferenceObjective   DPO (or IPO, APO-zero) on pairs of chosen and rejected responses
"""

from __future__ import annotations

from ... import data
from ...data.preferences import preference_format
from ..options import DataOptions, PreferenceOptions
from .base import Objective, StepLoss
from .chat import CHAT_SAMPLE_QUESTION, ChatObjective, sft_loss_sum, trained_tokens
from .preference import PreferenceObjective
from .text import TextObjective, lm_loss

__all__ = [
    "CHAT_SAMPLE_QUESTION",
    "ChatObjective",
    "Objective",
    "PreferenceObjective",
    "StepLoss",
    "TextObjective",
    "choose",
    "lm_loss",
    "sft_loss_sum",
    "trained_tokens",
]


def choose(
    options: DataOptions,
    tokenizer,
    *,
    max_steps: int,
    progress: bool,
    preference: PreferenceOptions | None = None,
    init_from: str | None = None,
) -> Objective:
    """The objective of --data-format (`options`: the run's `cfg.data`): preference for records of `chosen` and
    `rejected`, chat for records of `messages` (auto: the first the data holds), else text. `max_steps`
    (--max-steps) sizes what a streamed text corpus reads; `progress` shows a bar while text data is prepared;
    `preference` (the run's `cfg.preference`) is the preference objective's loss and reference; `init_from` (the run's
    --init-from) is what a live reference is rebuilt from on resume."""
    kind = options.data_format
    if kind == "auto":
        kind = "preference" if preference_format(options.data) else "chat" if data.looks_like_chat(options.data) else "text"
    if kind == "preference":
        return PreferenceObjective(options, preference or PreferenceOptions(), tokenizer, init_from)
    if kind == "chat":
        return ChatObjective(options, tokenizer)
    return TextObjective(options, tokenizer, max_steps=max_steps, progress=progress)
