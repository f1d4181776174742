"""What every decoder shares: its sampling options, the check of its arguments and the choice of the next tokens.

`generate` (the reference loop) and `fast` (the static-cache loop) both import this module and nothing
from each other, so a decode loop's contract lives in one place.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass

import torch

from .storage import is_int, is_number, shown

# Below this, logits / temperature overflows float32 for ordinary logits (1e-45 turns every one into inf and
# the softmax into NaN); 0 asks for greedy decoding, which is what a tiny temperature would approach.
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    """How a decode picks its tokens, named as transformers' `GenerationConfig` names them: at most
    `max_new_tokens` new tokens per row; temperature 0 is greedy (argmax), a positive one samples, from the
    `top_k` most likely tokens and the smallest set of probability >= `top_p` when those are not None.
    Every decoder (`generate`, `stream`, `TextStream`, `FastGenerator`, the demo's page) takes these.

    Raises ValueError naming the first field no decode can run with, and its valid range: max_new_tokens an
    integer >= 0; temperature 0 or a finite number >= MIN_TEMPERATURE; top_k an integer > 0 or None; top_p
    a number in (0, 1] or None. A value of the wrong type (None, text, a bool, NaN) is refused by name too.
    Every message starts with the field's name."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        t = self.temperature
        if not is_number(t) or not (t == 0 or MIN_TEMPERATURE <= t < math.inf):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {t!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k <= 0):
            raise ValueError(f"top_k must be a positive integer or None (off), got {self.top_k!r}")
        if self.top_p is not None and not (is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (a number) or None (off), got {self.top_p!r}")


class Unset:
    """The default of a decoder's sampling keyword (`max_new_tokens`, `temperature`, `top_k`, `top_p`): the
    caller did not pass it. The keyword then means SamplingParams' default, or the field of `sampling=` when
    that is given; passing both is refused (`sampling_params`), as the two could disagree. Its repr is that
    default, so a signature reads as a plain one."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        default = SamplingParams.__dataclass_fields__[self.name].default
        return "<required>" if default is MISSING else repr(default)


MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P = (Unset(name) for name in ("max_new_tokens", "temperature", "top_k", "top_p"))


def sampling_params(
    sampling: SamplingParams | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
) -> SamplingParams:
    """The options a decoder was given, as one SamplingParams: `sampling` itself, or one built from the
    keywords that were passed. ValueError when `sampling` is not a SamplingParams or comes with any of the
    keywords, and for a keyword no decode can run with (`SamplingParams`); TypeError when neither
    `sampling` nor `max_new_tokens` is given."""
    keywords = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    given = {name: value for name, value in keywords.items() if not isinstance(value, Unset)}
    if sampling is None:
        if "max_new_tokens" not in given:
            raise TypeError("max_new_tokens is required, or sampling=SamplingParams(max_new_tokens, ...)")
        return SamplingParams(**given)
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {shown(sampling)}")
    if given:
        raise ValueError(
            f"sampling= came with {', '.join(f'{name}=' for name in given)}; pass the sampling options in the "
            "SamplingParams or as keywords, not both"
        )
    return sampling


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


def check_args(
    model,
    input_ids: torch.Tensor,
    sampling: SamplingParams | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
) -> SamplingParams:
    """The SamplingParams a decode of `input_ids` (B, T) runs with (`sampling_params`); ValueError naming the
    argument it cannot run with: ids that are not a non-empty (B, T) tensor of the model's token ids, a
    sampling option (`SamplingParams`), or a prompt and max_new_tokens beyond the model's positions."""
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
    params = sampling_params(sampling, max_new_tokens, temperature, top_k, top_p)
    limit = model.config.max_position_embeddings
    if input_ids.shape[1] + params.max_new_tokens > limit:
        raise ValueError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
            f"{limit} positions; shorten the prompt or ask for fewer tokens"
        )
    return params


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


class Sampler:
    """The next tokens of a batch of `batch_size` rows, one step at a time, as every decode loop picks them:
    drawn from the last position's logits as `sampling` says (`sample_next`, with `generator`), and then,
    with end-of-sequence ids `eos` (a list, possibly empty), EOS (its first id) for every row that has
    already produced one of them. `finished` says when every row has."""

    def __init__(self, sampling: SamplingParams, eos: list[int], batch_size: int, device, generator=None):
        self.sampling, self.generator = sampling, generator
        self.eos = torch.tensor(eos, device=device, dtype=torch.long)
        self.unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B,) next tokens."""
        s = self.sampling
        next_tokens = sample_next(logits, s.temperature, s.top_k, s.top_p, self.generator)
        if self.eos.numel():
            next_tokens = torch.where(self.unfinished, next_tokens, self.eos[0])
            self.unfinished &= ~torch.isin(next_tokens, self.eos)
        return next_tokens

    @property
    def finished(self) -> bool:
        """Whether every row has produced an EOS (never without EOS ids: then no device sync is spent on it)."""
        return bool(self.eos.numel()) and not bool(self.unfinished.any())
