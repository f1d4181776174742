"""Token windows and the order they are read in: a held-out validation tail, non-overlapping windows of
seq_len + 1 tokens, and a per-epoch permutation fixed by the seed. The position in that order (sequences
consumed so far, all ranks) is all a checkpoint needs to continue the stream exactly; it does not care
how the tokens are split into shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sources import DataError


@dataclass(frozen=True)
class Split:
    """Train and validation tokens of one corpus (validation may be empty for a tiny corpus)."""

    train: np.ndarray
    val: np.ndarray
    key: str  # the cache key: which tokens these are


def split_tokens(tokens: np.ndarray, seq_len: int, val_fraction: float, key: str = "") -> Split:
    """Hold out the last `val_fraction` of the tokens (at least one sequence) when the corpus has room
    for a training sequence besides; raise when it cannot hold even one training sequence."""
    window = seq_len + 1
    n = len(tokens)
    if n < window:
        if n <= 1:
            raise DataError("the corpus is empty (no tokens after tokenising); pass data that contains text")
        raise DataError(
            f"the corpus has {n} tokens, fewer than one sequence of seq_len + 1 = {window}; use more data or a smaller --seq-len"
        )
    n_val = max(window, round(n * val_fraction)) if val_fraction > 0 and n >= 2 * window else 0
    return Split(train=tokens[: n - n_val], val=tokens[n - n_val :], key=key)


class Windows:
    """Non-overlapping windows of seq_len + 1 tokens; window i starts at token i * seq_len."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.count = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.count

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both (B, T) int64: targets are the inputs shifted by one token."""
        rows = np.stack(
            [np.asarray(self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1], dtype=np.int64) for i in indices]
        )
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


class Order:
    """The sequence in which training windows are read: a fresh permutation per epoch, each fixed by
    (seed, epoch). Position p (sequences consumed so far, over all ranks) maps to one window."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.count, generator=g).numpy(), epoch
        return self._perm

    def indices(self, position: int, n: int) -> list[int]:
        return [int(self._permutation(p // self.count)[p % self.count]) for p in range(position, position + n)]

    def epoch(self, position: int) -> float:
        return position / self.count
