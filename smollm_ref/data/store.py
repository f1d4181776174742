"""Token stores: a corpus tokenised once, by several processes, into shards that every rank memory-maps.
This module reads them and holds their format; `tokenise.py` prepares them.

    DIR/shard_000000.bin ...  tokens (uint16 when the vocabulary fits, else uint32), each document followed
                              by the separator; every shard holds `shard_tokens` tokens but the last
    DIR/progress.json         an unfinished prepare's state (shards done, documents consumed), to continue it
    DIR/index.json            written last: each shard's token count and SHA-256, documents, tokenizer
                              fingerprint, source and vocabulary size, data spec, token budget. No index: not a store.
    DIR/.lock                 held by the one process writing the store (a second prepare is refused)
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np

from .. import storage
from ..storage import shown
from .sources import DataError, json_kind

STORE_FORMAT = 1
INDEX = "index.json"
PROGRESS = "progress.json"


def separator_id(tokenizer) -> int:
    """The id that joins documents: `<|endoftext|>` (SmolLM2's document separator), else the tokenizer's EOS."""
    eot = tokenizer.get_vocab().get("<|endoftext|>")
    if eot is not None:
        return eot
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has neither <|endoftext|> nor an EOS token to separate documents; use another tokenizer")
    return tokenizer.eos_token_id


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def vocab_size(tokenizer) -> int:
    """One more than the largest id `tokenizer` can produce: every token id of its stores is below it."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardedTokens:
    """The shards of a store as one read-only token sequence: `len`, slices (views, no copy) and
    `np.asarray(view)` (which reads only the shards the view covers)."""

    def __init__(self, arrays: list[np.ndarray], start: int = 0, stop: int | None = None):
        self.arrays = arrays
        self.ends = np.cumsum([len(a) for a in arrays]) if arrays else np.zeros(0, dtype=np.int64)
        total = int(self.ends[-1]) if arrays else 0
        self.start, self.stop = start, total if stop is None else stop
        self.dtype = arrays[0].dtype if arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> ShardedTokens:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardedTokens takes contiguous slices only")
        a, b, _ = index.indices(len(self))
        return ShardedTokens(self.arrays, self.start + a, self.start + max(a, b))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        pieces, pos = [], self.start
        shard = int(np.searchsorted(self.ends, pos, side="right"))
        while pos < self.stop:
            first = int(self.ends[shard - 1]) if shard else 0
            take = min(self.stop, int(self.ends[shard])) - pos
            pieces.append(self.arrays[shard][pos - first : pos - first + take])
            pos, shard = pos + take, shard + 1
        if not pieces:
            out = np.zeros(0, dtype=self.dtype)
        else:
            out = np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])
        return out.astype(dtype, copy=False) if dtype is not None else out


class Store:
    """A finished token store, opened without reading its tokens (the shards are memory-mapped). Opening
    checks the index (every field `prepare` writes, of its type, and its token total equal to its shards')
    and each shard's size; `verify` checks each shard's checksum."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory).expanduser()
        index_path = self.dir / INDEX
        try:
            text = storage.read_small_text(index_path, "token store index")
        except (FileNotFoundError, NotADirectoryError):
            if (self.dir / PROGRESS).is_file():
                raise DataError(
                    f"{self.dir} is an unfinished token store (its prepare was interrupted); run the same prepare command again to finish it"
                ) from None
            raise DataError(
                f"{self.dir} is not a token store (no {INDEX}); pass a directory written by python -m smollm_ref.data prepare"
            ) from None
        except storage.BadFile as e:
            raise DataError(f"{e}; prepare the store again") from None
        self._index_text = text
        try:
            self.index = storage.loads_json(text, f"token store index {index_path}")
        except storage.BadFile as e:
            raise DataError(f"{e}; prepare the store again") from None
        _check_index(self.index, index_path)
        self.dtype = np.dtype(self.index["dtype"])
        self.shards = self.index["shards"]
        for shard in self.shards:
            path = self._shard_path(shard)
            expected = shard["tokens"] * self.dtype.itemsize
            problem = shard_problem(path, expected)
            if problem:
                raise DataError(f"token store shard {path} {problem}, its index says {expected} bytes; prepare the store again")

    def _shard_path(self, shard: dict) -> Path:
        return self.dir / shard["file"]

    @property
    def key(self) -> str:
        """Which tokens these are: a checksum of the index (it holds every shard's checksum)."""
        return hashlib.sha256(self._index_text.encode()).hexdigest()[:32]

    @property
    def num_tokens(self) -> int:
        return self.index["tokens"]

    def verify(self) -> int:
        """Every shard's SHA-256 against the index, and its token ids against the vocabulary size the index
        records (an index written before it was recorded: the checksums only). Returns the largest token id;
        raises `DataError` naming the first shard that differs, or that holds an id its tokenizer cannot
        produce."""
        vocab, top = self.index["tokenizer"].get("vocab_size"), 0
        for shard in self.shards:
            path = self._shard_path(shard)
            digest, largest = _sha256_and_max(path, self.dtype)
            if digest != shard["sha256"]:
                raise DataError(f"token store shard {path} does not match its checksum (corrupt); prepare the store again")
            if vocab is not None and largest >= vocab:
                raise DataError(
                    f"token store shard {path} holds token id {largest:,}, but its tokenizer has {vocab:,} tokens "
                    f"(ids 0 to {vocab - 1:,}); prepare the store again"
                )
            top = max(top, largest)
        return top

    def check_tokenizer(self, tokenizer) -> None:
        if self.index["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise DataError(
                f"token store {self.dir} was made with another tokenizer ({self.index['tokenizer'].get('source') or 'unnamed'}); "
                f"train it with --tokenizer {self.index['tokenizer'].get('source') or 'SOURCE'}, or prepare it again with this one"
            )

    def tokens(self) -> ShardedTokens:
        arrays = [
            np.memmap(self._shard_path(s), dtype=self.dtype, mode="r") if s["tokens"] else np.zeros(0, self.dtype)
            for s in self.shards
        ]
        return ShardedTokens(arrays)


TOKEN_DTYPES = ("uint16", "uint32")  # what `token_dtype` gives; any other would read the shards as other numbers


def _whole(value) -> bool:
    """A count as `prepare` writes one: an int >= 0 (not a bool, nor a float such as 2.0)."""
    return storage.is_int(value) and value >= 0


def shown_count(n: int) -> str:
    """A count read from an index or a progress record, for a one-line error: `1,234`, or for an absurd one its
    number of digits."""
    return f"{n:,}" if n < 10**24 else f"a {len(str(n)):,}-digit number of"  # JSON allows 4,300 digits: keep the line short


def check_shards(shards, where: str, advice: str = "prepare the store again") -> None:
    """DataError unless `shards` (an index's or a progress record's) is a list of {file: a plain name, tokens: a
    whole number, sha256: 64 hex}; `advice` ends the message."""
    advice = f"; {advice}" if advice else ""
    if not isinstance(shards, list):
        raise DataError(f"{where}: 'shards' is {json_kind(shards)}, not a list{advice}")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise DataError(f"{where}: shards[{i}] is {json_kind(shard)}, not an object{advice}")
        name, tokens, sha = shard.get("file"), shard.get("tokens"), shard.get("sha256")
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DataError(f"{where}: shards[{i}] names no file inside the store ({shown(name)}){advice}")
        if not _whole(tokens):
            raise DataError(f"{where}: shards[{i}] 'tokens' is {shown(tokens)}, not a whole number{advice}")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise DataError(f"{where}: shards[{i}] 'sha256' is {shown(sha)}, not a SHA-256 in hex{advice}")


def _check_index(index, path: Path) -> None:
    """DataError naming the first value of a store's index that is not what `prepare` writes there."""
    where = f"token store index {path}"
    if not isinstance(index, dict):
        raise DataError(f"{where} is {json_kind(index)}, not an object; prepare the store again")
    if index.get("format") != STORE_FORMAT:
        raise DataError(
            f"{path.parent} has store format {shown(index.get('format'))}, this smollm_ref reads {STORE_FORMAT}; prepare it again"
        )
    if index.get("dtype") not in TOKEN_DTYPES:
        raise DataError(
            f"{where}: 'dtype' is {shown(index.get('dtype'))}, not a token dtype ({' or '.join(TOKEN_DTYPES)}); prepare the store again"
        )
    check_shards(index.get("shards"), where)
    for key in ("tokens", "documents", "separator"):
        if not _whole(index.get(key)):
            raise DataError(f"{where}: {key!r} is {shown(index.get(key))}, not a whole number; prepare the store again")
    held = sum(shard["tokens"] for shard in index["shards"])
    if index["tokens"] != held:
        raise DataError(
            f"{where} says {shown_count(index['tokens'])} tokens but its {len(index['shards'])} shard(s) hold {held:,}; prepare the store again"
        )
    if held == 0:
        raise DataError(f"{where}: the store holds no tokens; prepare it from data that contains text")
    tokenizer = index.get("tokenizer")
    if not (isinstance(tokenizer, dict) and isinstance(tokenizer.get("fingerprint"), str)):
        raise DataError(
            f"{where}: 'tokenizer' is {shown(tokenizer)}, not a tokenizer's fingerprint and source; prepare the store again"
        )
    if not isinstance(tokenizer.get("source"), (str, type(None))):
        raise DataError(f"{where}: the tokenizer's 'source' is {shown(tokenizer['source'])}, not a name; prepare the store again")
    vocab = tokenizer.get("vocab_size")  # absent from the index of an older smollm_ref: ids are then not checked
    if vocab is not None and not (_whole(vocab) and vocab > 0):
        raise DataError(
            f"{where}: the tokenizer's 'vocab_size' is {shown(vocab)}, not a number of tokens; prepare the store again"
        )
    if vocab is not None and index["separator"] >= vocab:
        raise DataError(
            f"{where}: 'separator' is {index['separator']:,}, not an id of its tokenizer's {vocab:,} tokens; prepare the store again"
        )


def shard_problem(path: Path, size: int) -> str | None:
    """What is wrong with a shard file that should hold `size` bytes (None: nothing). A link to a device
    (/dev/zero) is said to be one, not called missing; it is never opened."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "is missing"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file" + (f" (a link to {os.path.realpath(path)})" if path.is_symlink() else "")
    if info.st_size != size:
        return f"is {info.st_size} bytes"
    return None


def is_store(path: str | Path) -> bool:
    """Whether `path` is a token store (finished or not): a directory holding an index or a progress file,
    whatever they are (a FIFO or a device there is refused by `Store`, not read as a corpus)."""
    path = Path(path).expanduser()
    return path.is_dir() and (os.path.lexists(path / INDEX) or os.path.lexists(path / PROGRESS))


def _sha256_and_max(path: Path, dtype: np.dtype) -> tuple[str, int]:
    """A shard's SHA-256 and its largest token id (0 for an empty shard), in one read."""
    h, largest = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):  # a multiple of every token size: no token is split between chunks
            h.update(chunk)
            largest = max(largest, int(np.frombuffer(chunk, dtype=dtype, count=len(chunk) // dtype.itemsize).max()))
    return h.hexdigest(), largest
