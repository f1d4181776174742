"""Log-likelihoods of continuations after contexts: all a multiple-choice benchmark asks of a model.

**The token boundary.** A choice's log-likelihood is the sum, over its tokens, of log p(token | everything
before it). Which tokens are "its" is decided as lm-evaluation-harness and lighteval decide it
(`tok_encode_pair` in both): whitespace at the end of the context moves to the front of the continuation;
the context alone is encoded (`ctx`), context + continuation together are encoded (`whole`), and the
continuation's tokens are `whole[len(ctx):]`. The model then reads `ctx + cont`, so every choice of an item
shares the context's tokens exactly. An empty context (no built-in task has one; a local task may) is replaced
by `<|endoftext|>` (else the tokenizer's EOS), so that the first continuation token has something to be
predicted from; lm-evaluation-harness puts its prefix token there too, the BOS where a tokenizer has one
(`<|im_start|>` for SmolLM2's), so on such items the two differ. Texts are encoded without special tokens
(SmolLM2's tokenizer adds none either way).

**Shared context.** Each item is one unit: its context once, then every choice's tokens one after another,
each choice placed at the positions right after the context (position ids restart at `len(ctx)` for each
choice) and seeing the context and its own earlier tokens only (a tree-shaped mask; the block-diagonal
mask of packing is the special case of one choice). The context is computed once for all its choices.

**Packed, length-sorted batches.** Units are sorted longest first and scored `batch_size` rows at a time;
each row is as long as its batch's longest unit, and short units are packed several to a row (position ids
restart with each unit, and the mask keeps units apart), so that little of a batch is padding. The logits
are computed only where a choice token is predicted, and the log-softmax in float32 whatever the model's
dtype.

With `share_context=False` every (context, choice) pair is its own unit, a plain causal sequence, as the
harness runs it: the reference the shared rows are tested against (with `batch_size=1` nothing is packed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import LlamaForCausalLM


@dataclass(frozen=True)
class Encoded:
    """One item's tokens: `context` and one token list per choice (each at least one token). `truncated`: the
    context lost tokens from its start to fit the model; `merged`: for some choice, context + choice encode
    with a token across the boundary, so that `whole[:len(ctx)] != ctx` (the harness scores the same tokens
    then: those of `whole` past the context's length)."""

    context: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]
    truncated: bool = False
    merged: bool = False

    @property
    def length(self) -> int:
        """Tokens the model reads for this item: the context, and each choice but its last token (a token is
        read only to predict the next one)."""
        return len(self.context) + sum(len(c) - 1 for c in self.choices)


def encode_items(
    tokenizer,
    items: Sequence[tuple[str, Sequence[str]]],
    max_length: int | None = None,
    names: Sequence[str] | None = None,
) -> list[Encoded]:
    """(context, choices) pairs to token ids with the boundary rule above. Where a context + choice would
    not fit `max_length` positions (the choice's last token is never read, as in the harness), the context
    loses tokens from its start; `truncated` says so. Raises ValueError for a choice that adds no token or
    is too long on its own, naming the item by `names[i]` (e.g. "piqa item 17")."""
    contexts, wholes = [], []
    for context, choices in items:
        ctx = context.rstrip()  # its trailing whitespace goes to the front of each choice: whole = ctx + moved + choice
        contexts.append(ctx)
        wholes += [context + choice for choice in choices]
    ctx_ids = tokenizer(contexts, add_special_tokens=False).input_ids if contexts else []
    whole_ids = tokenizer(wholes, add_special_tokens=False).input_ids if wholes else []
    prefix = _prefix_token(tokenizer)
    out: list[Encoded] = []
    k = 0
    for i, (_, choices) in enumerate(items):
        where = names[i] if names is not None else f"item {i}"
        ctx = list(ctx_ids[i])
        conts, merged = [], False
        for choice in choices:
            whole = whole_ids[k]
            k += 1
            cont = whole[len(ctx) :]
            merged = merged or whole[: len(ctx)] != ctx
            if not cont:
                raise ValueError(
                    f"{where}: choice {choice[:40]!r} adds no token after its context (it merges into the context's "
                    "last token); start the choice with a space"
                )
            conts.append(tuple(cont))
        if not ctx:
            ctx = [prefix]
        truncated = False
        if max_length is not None:
            room = max_length + 1 - max(len(c) for c in conts)
            if room < 1:
                raise ValueError(
                    f"{where}: a choice of {max(len(c) for c in conts)} tokens does not fit the model's {max_length} "
                    "positions; score this task with a model of more positions, or leave the item out"
                )
            if len(ctx) > room:
                ctx, truncated = ctx[-room:], True
        out.append(Encoded(tuple(ctx), tuple(conts), truncated, merged))
    return out


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
    """The item as one unit: its context, then each choice's tokens but the last (a choice's first token is
    predicted from the context's last, each later one from the choice's token before it; the last token
    predicts nothing, so it is not read: a one-token choice adds no token to the row)."""
    tokens, positions, segments = list(item.context), list(range(len(item.context))), [0] * len(item.context)
    targets = []
    n = len(item.context)
    for i, cont in enumerate(item.choices):
        start = len(tokens)
        for j, token in enumerate(cont):
            targets.append((n - 1 if j == 0 else start + j - 1, token, i))
        read = cont[:-1]
        tokens += read
        positions += range(n, n + len(read))
        segments += [i + 1] * len(read)
    return _Row(tokens, positions, segments, targets)


def _tree_mask(units: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: query q sees key k at or before it in the same unit (item) that is context or of
    q's own choice. Padding (unit -1) sees the padding before it, so that its attention stays finite (a fully
    masked query is NaN, and NaN times a zero weight would reach real queries); no real query sees padding."""
    t = units.shape[1]
    order = torch.arange(t, device=units.device)
    causal = order[None, :, None] >= order[None, None, :]  # (1, T, T): q >= k in the row's order
    same_unit = units[:, :, None] == units[:, None, :]
    visible = (segments[:, None, :] == 0) | (segments[:, :, None] == segments[:, None, :])
    return (causal & same_unit & visible)[:, None]


@torch.no_grad()
def _score_rows(model: LlamaForCausalLM, rows: list[list[_Row]]) -> list[list[list[float]]]:
    """Summed log-probabilities per choice of each unit packed in each row of one batch (rows right-padded to
    the longest): `out[row][unit][choice]`."""
    device = model.lm_head.weight.device
    t = max(sum(len(u.tokens) for u in row) for row in rows)
    b = len(rows)
    tokens = torch.zeros(b, t, dtype=torch.long)
    positions = torch.zeros(b, t, dtype=torch.long)
    units = torch.full((b, t), -1, dtype=torch.long)
    segments = torch.zeros(b, t, dtype=torch.long)
    where, targets = [], []
    for i, row in enumerate(rows):
        offset = 0
        for k, u in enumerate(row):
            n = len(u.tokens)
            tokens[i, offset : offset + n] = torch.tensor(u.tokens)
            positions[i, offset : offset + n] = torch.tensor(u.positions)
            segments[i, offset : offset + n] = torch.tensor(u.segments)
            units[i, offset : offset + n] = k
            where += [(i, offset + p) for p, _, _ in u.targets]
            targets += [tok for _, tok, _ in u.targets]
            offset += n
    single = all(len(row) == 1 and max(row[0].segments) <= 1 and len(row[0].tokens) == t for row in rows)
    mask = None if single else _tree_mask(units, segments).to(device)
    h = model.model(tokens.to(device), attention_mask=mask, position_ids=positions.to(device))  # (B, T, C)
    rows_idx = torch.tensor([i for i, _ in where], device=device)
    pos_idx = torch.tensor([p for _, p in where], device=device)
    logits = model.lm_head(h[rows_idx, pos_idx]).float()  # (N, V): only where a choice token is predicted
    target_ids = torch.tensor(targets, device=device)[:, None]
    logprobs = F.log_softmax(logits, dim=-1).gather(-1, target_ids)[:, 0].cpu().tolist()
    out, k = [], 0
    for row in rows:
        per_unit = []
        for u in row:
            sums = [0.0] * (max(c for _, _, c in u.targets) + 1)
            for _, _, c in u.targets:
                sums[c] += logprobs[k]  # float32 terms added in Python floats (float64), in token order
                k += 1
            per_unit.append(sums)
        out.append(per_unit)
    return out


def _batches(units: list, batch_size: int):
    """Units (sorted longest first) in batches of at most `batch_size` rows, each row as long as the batch's
    first (longest) unit and filled with the units that follow while they fit: the tail of short units packs
    several to a row instead of padding a long one."""
    i = 0
    while i < len(units):
        length = len(units[i][2].tokens)
        batch = []
        while i < len(units) and len(batch) < batch_size:
            row, used = [units[i]], len(units[i][2].tokens)
            i += 1
            while i < len(units) and used + len(units[i][2].tokens) <= length:
                row.append(units[i])
                used += len(units[i][2].tokens)
                i += 1
            batch.append(row)
        yield batch


def loglikelihoods(
    model: LlamaForCausalLM,
    items: Sequence[Encoded],
    batch_size: int = 16,
    share_context: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """For each item, the summed log-probability (natural log, float64 sums of float32 terms) of each
    choice's tokens after its context: `result[i][j]` for item i, choice j.

    Units (an item with `share_context`, one (context, choice) pair without) are scored longest first,
    `batch_size` rows at a time, short units packed several to a row (`_batches`); `progress(n)` is called
    with the number of items finished."""
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
    for batch in _batches(rows, batch_size):
        done = 0
        scored = _score_rows(model, [[unit for _, _, unit in row] for row in batch])
        for row, row_scores in zip(batch, scored):
            for (i, j, _), scores in zip(row, row_scores):
                if j is None:
                    results[i] = scores
                else:
                    results[i][j] = scores[0]
                left[i] -= 1
                done += left[i] == 0
        if progress is not None and done:
            progress(done)
    return results
