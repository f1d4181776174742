"""What every decoder shares: the check of its arguments and the choice of the next token from logits.

`generate` (the reference loop) and `fast` (the static-cache loop) both import this module and nothing
from each other, so a decode loop's contract lives in one place.
"""

from __future__ import annotations

import math

import torch

from .storage import is_int, is_number

# Below this, logits / temperature overflows float32 for ordinary logits (1e-45 turns every one into inf and
# the softmax into NaN); 0 asks for greedy decoding, which is what a tiny temperature would approach.
MIN_TEMPERATURE = 1e-3


def check_sampling(max_new_tokens: int, temperature: float, top_k, top_p, where: str = "") -> None:
    """Raise ValueError naming the sampling option that no decode can run with, and its valid range: what
    every decoder (`generate`, `FastGenerator`, the demo's `Settings`) accepts. A value of the wrong type
    (None, text, a bool, NaN) is refused by name too. `where` prefixes the option's name in the message."""
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"{where}max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not is_number(temperature) or not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf):
        raise ValueError(f"{where}temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise ValueError(f"{where}top_k must be a positive integer or None (off), got {top_k!r}")
    if top_p is not None and not (is_number(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"{where}top_p must be in (0, 1] (a number) or None (off), got {top_p!r}")


def eos_ids(eos_token_id, default) -> list[int]:
    """The end-of-sequence ids a decode stops at: `eos_token_id` (an id, a list of ids, or None for
    `default`, the model config's). ValueError for anything else (a negative id, text, a float)."""
    eos = default if eos_token_id is None else eos_token_id
    ids = [eos] if not isinstance(eos, (list, tuple)) else list(eos)
    if eos is not None and not all(is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a token id >= 0, a list of them, or None, got {eos_token_id!r}")
    return [] if eos is None else ids


def left_align(input_ids: torch.Tensor, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A padded batch as the decode loops take it: each row's padding moved to its left end.

    input_ids (B, T); attention_mask (B, T) of 0 (padding) and 1 (token), each row one unbroken run of 1s
    padded on the left, the right or both: a tokenizer's `padding=True` pads on the right for SmolLM2.
    Returns (ids, mask), both (B, T), every row rotated so that its last token is at T - 1 (the pad ids go
    with the padding); mask is None when there is no padding at all. A decode continues each row after its
    last token, so a right-padded batch left as it is would continue the padding instead.
    Raises ValueError for a mask that is not a (B, T) tensor of 0s and 1s, a row with no token, or a row
    with padding between its tokens."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor of 0s and 1s, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}; they must match"
        )
    mask = attention_mask.to(input_ids.device)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    real = mask.bool()
    if bool(real.all()):
        return input_ids, None
    length = real.sum(1)
    if not bool(length.all()):
        row = int((length == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has no token (all 0); every prompt needs at least one")
    t = input_ids.shape[1]
    index = torch.arange(t, device=input_ids.device)
    first = torch.where(real, index, t).amin(1)
    last = torch.where(real, index, -1).amax(1)
    holes = last - first + 1 != length
    if bool(holes.any()):
        row = int(holes.nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} has padding between its tokens; pad each prompt on one side (left or right) only"
        )
    source = (index[None, :] + last[:, None] + 1) % t  # (B, T): position j of the new row takes this old one
    return input_ids.gather(1, source), real.gather(1, source).to(torch.long)


def check_args(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    """Raise ValueError naming the argument a decode loop cannot run with."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        raise ValueError(
            f"input_ids must be a tensor of token ids (integers), got {getattr(input_ids, 'dtype', type(input_ids))}"
        )
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch>0, length>0), got shape {tuple(input_ids.shape)}")
    vocab = model.config.vocab_size
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids hold the id {low if low < 0 else high}, outside the model's vocabulary of {vocab}")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{limit} positions; shorten the prompt or ask for fewer tokens"
        )


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next tokens. temperature 0 is greedy (argmax)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p (always >= 1)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
