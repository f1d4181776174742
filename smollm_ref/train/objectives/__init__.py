"""Training objectives, one object each, chosen once from the data (`choose`); the run and the loop call the
objective (`Objective`) and never ask which one it is.

    text   TextObjective   next-token loss on every token of token-store windows (pretraining)
    chat   ChatObjective   loss on the assistant's replies of chat-template conversations (SFT)
"""

from __future__ import annotations

from ... import data
from ..options import TrainConfig
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


def choose(cfg: TrainConfig, tokenizer) -> Objective:
    """The objective of --data-format: chat for records of `messages` (auto: when the data holds them), else text."""
    chat = cfg.data_format == "chat" if cfg.data_format != "auto" else data.looks_like_chat(cfg.data)
    return (ChatObjective if chat else TextObjective)(cfg, tokenizer)
