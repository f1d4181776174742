"""Log-likelihoods of continuations after contexts: all a multiple-choice benchmark asks of a model.

**The token boundary.** A choice's log-likelihood is the sum, over its tokens, of log p(token | everything
before it). Which tokens are "its" is decided as lm-evaluation-harness and lighteval decide it
(`tok_encode_pair` in both): whitespace at the end of the context moves to the front of the continuation;
the context alone is encoded (`ctx`), context + continuation together are encoded (`whole`), and the
continuation's tokens are `whole[len(ctx):]`. The model then reads `ctx + cont`, so every choice of an item
shares the context's tokens exactly. An empty context is replaced by the end-of-text token, as the harness
does, so that the first continuation token has something to be predicted from. Texts are encoded without
special tokens (SmolLM2's tokenizer adds none either way).

**Shared context.** Each item is one row: its context once, then every choice's tokens one after another,
each choice placed at the positions right after the context (position ids restart at `len(ctx)` for each
choice) and seeing the context and its own earlier tokens only (a tree-shaped mask; the block-diagonal
mask of packing is the special case of one choice). The context is computed once for all its choices.
Rows are sorted by length and scored `batch_size` at a time; the logits are computed only where a choice
token is predicted, and the log-softmax in float32 whatever the model's dtype.

With `share_context=False` every (context, choice) pair is its own plain causal row, as the harness runs
it: the reference the shared rows are tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import LlamaForCausalLM


@dataclass(frozen=True)
class Encoded:
    """One item's tokens: `context` and one token list per choice (each at least one token)."""

    context: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]
    truncated: bool = False

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) for c in self.choices)


def encode_items(tokenizer, items: Sequence[tuple[str, Sequence[str]]], max_length: int | None = None) -> list[Encoded]:
    """(context, choices) pairs to token ids with the boundary rule above. Where a context + choice would
    not fit `max_length` positions, the context loses tokens from its start (the harness does the same);
    `truncated` says so. Raises ValueError for a choice that encodes to no token."""
    contexts, wholes, owners = [], [], []
    for context, choices in items:
        for choice in choices:
            spaces = len(context) - len(context.rstrip())
            ctx, cont = (context[:-spaces], context[-spaces:] + choice) if spaces else (context, choice)
            wholes.append(ctx + cont)
            owners.append(len(contexts))
        contexts.append(_rstrip_context(context))
    ctx_ids = tokenizer(contexts, add_special_tokens=False).input_ids if contexts else []
    whole_ids = tokenizer(wholes, add_special_tokens=False).input_ids if wholes else []
    prefix = _prefix_token(tokenizer)
    out: list[Encoded] = []
    k = 0
    for i, (_, choices) in enumerate(items):
        ctx = list(ctx_ids[i])
        conts = []
        for choice in choices:
            cont = whole_ids[k][len(ctx) :]
            k += 1
            if not cont:
                raise ValueError(f"choice {choice!r} encodes to no token after its context; a choice must add text")
            conts.append(tuple(cont))
        if not ctx:
            ctx = [prefix]
        truncated = False
        if max_length is not None:
            room = max_length - max(len(c) for c in conts)
            if room < 1:
                raise ValueError(
                    f"a choice of {max(len(c) for c in conts)} tokens does not fit the model's {max_length} positions"
                )
            if len(ctx) > room:
                ctx, truncated = ctx[-room:], True
        out.append(Encoded(tuple(ctx), tuple(conts), truncated))
    return out


def _rstrip_context(context: str) -> str:
    spaces = len(context) - len(context.rstrip())
    return context[:-spaces] if spaces else context


def _prefix_token(tokenizer) -> int:
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither an end-of-text nor a beginning token to stand for an empty context")
    # SmolLM2's chat tokenizer names <|im_end|> its EOS; the harness's "end of text" is <|endoftext|> where it exists.
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else None
    return endoftext if endoftext is not None else token


@dataclass(frozen=True)
class _Row:
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0 for the context, i + 1 for choice i
    targets: list[tuple[int, int, int]]  # (input position that predicts, target token, choice index)


def _shared_row(item: Encoded) -> _Row:
    tokens, positions, segments = list(item.context), list(range(len(item.context))), [0] * len(item.context)
    targets = []
    n = len(item.context)
    for i, cont in enumerate(item.choices):
        start = len(tokens)
        for j, token in enumerate(cont):
            targets.append((n - 1 if j == 0 else start + j - 1, token, i))
        tokens += cont
        positions += range(n, n + len(cont))
        segments += [i + 1] * len(cont)
    return _Row(tokens, positions, segments, targets)


def _tree_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: query q sees key k at or before it that is context or of q's own choice.
    Padding (segment -1) sees itself only, so that its attention stays finite (a fully masked row is NaN,
    and NaN times a zero weight would reach the real rows)."""
    t = segments.shape[1]
    order = torch.arange(t, device=segments.device)
    causal = order[None, :, None] >= order[None, None, :]  # (1, T, T): q >= k in the row's order
    same = (segments[:, None, :] == 0) | (segments[:, :, None] == segments[:, None, :])
    pad = segments[:, :, None] < 0
    mask = causal & same & ~(pad | (segments[:, None, :] < 0))
    mask = mask | (pad & (order[None, :, None] == order[None, None, :]))
    return mask[:, None]


@torch.no_grad()
def _score_rows(model: LlamaForCausalLM, rows: list[_Row]) -> list[list[float]]:
    """Summed log-probabilities per choice, for each row of one batch (right-padded to the longest)."""
    device = model.lm_head.weight.device
    t = max(len(r.tokens) for r in rows)
    b = len(rows)
    tokens = torch.zeros(b, t, dtype=torch.long)
    positions = torch.zeros(b, t, dtype=torch.long)
    segments = torch.full((b, t), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.tokens)
        tokens[i, :n] = torch.tensor(r.tokens)
        positions[i, :n] = torch.tensor(r.positions)
        segments[i, :n] = torch.tensor(r.segments)
    tokens, positions, segments = tokens.to(device), positions.to(device), segments.to(device)
    single = all(max(r.segments) <= 1 and len(r.tokens) == t for r in rows)
    mask = None if single else _tree_mask(segments)
    h = model.model(tokens, attention_mask=mask, position_ids=positions)  # (B, T, C)
    where = [(i, p) for i, r in enumerate(rows) for p, _, _ in r.targets]
    rows_idx = torch.tensor([i for i, _ in where], device=device)
    pos_idx = torch.tensor([p for _, p in where], device=device)
    targets = torch.tensor([tok for r in rows for _, tok, _ in r.targets], device=device)
    logits = model.lm_head(h[rows_idx, pos_idx]).float()  # (N, V): only where a choice token is predicted
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0].cpu().tolist()
    out, k = [], 0
    for r in rows:
        sums = [0.0] * (max(c for _, _, c in r.targets) + 1)
        for _, _, c in r.targets:
            sums[c] += logprobs[k]  # float32 terms added in Python floats (float64), in token order
            k += 1
        out.append(sums)
    return out


def loglikelihoods(
    model: LlamaForCausalLM,
    items: Sequence[Encoded],
    batch_size: int = 16,
    share_context: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """For each item, the summed log-probability (natural log, float64 sums of float32 terms) of each
    choice's tokens after its context: `result[i][j]` for item i, choice j.

    Rows are scored longest first, `batch_size` rows at a time (a row is an item with `share_context`, one
    (context, choice) pair without); `progress(n)` is called with the number of items finished."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if share_context:
        rows = [(i, None, _shared_row(item)) for i, item in enumerate(items)]
    else:
        rows = [
            (i, j, _shared_row(Encoded(item.context, (cont,))))
            for i, item in enumerate(items)
            for j, cont in enumerate(item.choices)
        ]
    rows.sort(key=lambda row: -len(row[2].tokens))
    results: list[list[float]] = [[0.0] * len(item.choices) for item in items]
    left = [1 if share_context else len(item.choices) for item in items]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        done = 0
        for (i, j, _), scores in zip(chunk, _score_rows(model, [row for _, _, row in chunk])):
            if j is None:
                results[i] = scores
            else:
                results[i][j] = scores[0]
            left[i] -= 1
            done += left[i] == 0
        if progress is not None and done:
            progress(done)
    return results
