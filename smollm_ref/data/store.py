"""Token stores: a corpus tokenised once, by several processes, into shards that every rank memory-maps.

    DIR/shard_000000.bin ...  tokens (uint16 when the vocabulary fits, else uint32), each document followed
                              by the separator; every shard holds `shard_tokens` tokens but the last
    DIR/progress.json         an unfinished prepare's state (shards done, documents consumed), to continue it
    DIR/index.json            written last: each shard's token count and SHA-256, documents, tokenizer
                              fingerprint and source, data spec, token budget. No index: not a store.

Documents stream through in bounded batches (never the corpus in memory); workers tokenise batches in
parallel and the results are written in document order, so the tokens do not depend on the worker count.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .. import storage
from .sources import DataError, iter_documents, json_kind, shown, source_key

STORE_FORMAT = 1
INDEX = "index.json"
PROGRESS = "progress.json"
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MB of uint16
BATCH_DOCS, BATCH_CHARS = 256, 1 << 20  # documents per task: bounded by count and by characters


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


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---- reading a store ----------------------------------------------------------------------------------------


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
            problem = _shard_problem(path, expected)
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

    def verify(self) -> None:
        """Every shard's SHA-256 against the index (DataError naming the first that differs)."""
        for shard in self.shards:
            if _sha256(self._shard_path(shard)) != shard["sha256"]:
                raise DataError(
                    f"token store shard {self._shard_path(shard)} does not match its checksum (corrupt); prepare the store again"
                )

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
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**24 else f"a {len(str(n)):,}-digit number of"  # JSON allows 4,300 digits: keep the line short


def _check_shards(shards, where: str, advice: str = "prepare the store again") -> None:
    """DataError unless `shards` is a list of {file: a plain name, tokens: a whole number, sha256: 64 hex}."""
    if not isinstance(shards, list):
        raise DataError(f"{where}: 'shards' is {json_kind(shards)}, not a list; {advice}")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise DataError(f"{where}: shards[{i}] is {json_kind(shard)}, not an object; {advice}")
        name, tokens, sha = shard.get("file"), shard.get("tokens"), shard.get("sha256")
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DataError(f"{where}: shards[{i}] names no file inside the store ({shown(name)}); {advice}")
        if not _whole(tokens):
            raise DataError(f"{where}: shards[{i}] 'tokens' is {shown(tokens)}, not a whole number; {advice}")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise DataError(f"{where}: shards[{i}] 'sha256' is {shown(sha)}, not a SHA-256 in hex; {advice}")


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
    _check_shards(index.get("shards"), where)
    for key in ("tokens", "documents", "separator"):
        if not _whole(index.get(key)):
            raise DataError(f"{where}: {key!r} is {shown(index.get(key))}, not a whole number; prepare the store again")
    held = sum(shard["tokens"] for shard in index["shards"])
    if index["tokens"] != held:
        raise DataError(
            f"{where} says {_count(index['tokens'])} tokens but its {len(index['shards'])} shard(s) hold {held:,}; prepare the store again"
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


def _shard_problem(path: Path, size: int) -> str | None:
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# ---- tokenising: workers ----------------------------------------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a process per core; no thread pool inside each
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode(batch: list[str], sep: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch of documents -> (their tokens, each followed by `sep`, concatenated; tokens per document)."""
    encodings = _WORKER_TOKENIZER.encode_batch(batch, add_special_tokens=False)
    lengths = np.array([len(e.ids) + 1 for e in encodings], dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(e.ids + [sep] for e in encodings), dtype=dtype, count=int(lengths.sum()))
    del encodings
    _release_memory()
    return flat, lengths


def _release_memory() -> None:
    """Hand freed heap back to the system. One multi-megabyte document (the standard library has a 4 M
    character one) makes the tokenizer allocate ~500 MB; glibc keeps that after it is freed, so every worker
    would otherwise sit at its worst document's size for the rest of the run."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(
    docs: Iterable[str], tokenizer_json: str, sep: int, dtype: str, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in document order; at most 2 x workers batches in flight (bounded memory)."""
    if workers <= 1:
        global _WORKER_TOKENIZER
        from tokenizers import Tokenizer

        _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)
        for batch in _batches(docs):
            yield _encode(batch, sep, dtype)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer_json,)) as pool:
        pending = deque()
        for batch in _batches(docs):
            pending.append(pool.apply_async(_encode, (batch, sep, dtype)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- tokenising: the writer ---------------------------------------------------------------------------------


class _ShardWriter:
    """Appends documents' tokens to shards of exactly `shard_tokens` (the last may be shorter). Each finished
    shard is fsynced, renamed into place and recorded in progress.json with the stream position it ends at:
    (documents written whole, tokens of the next document already written)."""

    def __init__(self, out: Path, shard_tokens: int, progress: dict):
        self.out, self.shard_tokens, self.progress = out, shard_tokens, progress
        self.file = self.hash = self.tmp = None
        self.count = 0

    def write_document(self, tokens: np.ndarray, index: int, already: int = 0) -> None:
        """Document `index`'s tokens, of which the first `already` were written by an earlier prepare."""
        done = already
        tokens = tokens[already:]
        while len(tokens):
            if self.file is None:
                name = f"shard_{len(self.progress['shards']):06d}.bin"
                self.tmp = self.out / f"{name}.tmp{os.getpid()}"
                self.file, self.hash, self.count = open(self.tmp, "wb"), hashlib.sha256(), 0
            take = min(len(tokens), self.shard_tokens - self.count)
            chunk = tokens[:take].tobytes()
            self.file.write(chunk)
            self.hash.update(chunk)
            self.count, done, tokens = self.count + take, done + take, tokens[take:]
            if self.count == self.shard_tokens:
                self.close((index + 1, 0) if not len(tokens) else (index, done))

    def close(self, position: tuple[int, int]) -> None:
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        name = self.tmp.name.split(".tmp")[0]
        self.tmp.replace(self.out / name)
        self.progress["shards"].append({"file": name, "tokens": self.count, "sha256": self.hash.hexdigest()})
        self.progress["documents"], self.progress["offset"] = position
        self.progress["tokens"] = sum(s["tokens"] for s in self.progress["shards"])
        _write_json(self.out / PROGRESS, self.progress)
        self.file = None

    def abandon(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            self.file = None


def _warn(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)


def prepare(
    spec: str,
    out: str | Path,
    tokenizer,
    *,
    tokenizer_source: str | None = None,
    text_field: str = "text",
    budget: int | None = None,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> Store:
    """Tokenise `spec` into a store at `out` (see the module docstring), or finish an interrupted prepare of
    the same spec, tokenizer and budget there. `budget` stops after that many tokens (None: all of them)."""
    if budget is not None and budget <= 0:
        raise DataError(f"the token budget must be a positive number of tokens, got {budget}")
    out = Path(out).expanduser()
    if (out / INDEX).is_file():
        raise DataError(f"{out} already holds a finished token store; pass another --out, or remove it to prepare again")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a directory")
    storage.sweep_stale(out, "shard_", ".tmp")  # shards of a killed prepare (a live one's are left alone)
    storage.sweep_stale(out, ".", ".tmp")
    if out.is_dir() and any(out.iterdir()) and not (out / PROGRESS).is_file():
        raise DataError(f"--out {out} is a directory that is not a token store; pass a new or empty directory")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError("preparing a token store needs a fast (tokenizers-backed) tokenizer")
    dtype = token_dtype(len(tokenizer))
    wanted = {
        "format": STORE_FORMAT,
        "spec": spec,
        "source_key": source_key(spec, text_field),
        "text_field": text_field,
        "budget": budget,
        "dtype": dtype.name,
        "separator": separator_id(tokenizer),
        "shard_tokens": shard_tokens,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "source": tokenizer_source},
    }
    state = _resume_state(out, wanted)
    out.mkdir(parents=True, exist_ok=True)
    return _tokenise(out, state, backend.to_str(), workers or os.cpu_count() or 1, progress)


def _resume_state(out: Path, wanted: dict) -> dict:
    if not (out / PROGRESS).is_file():
        return {**wanted, "shards": [], "documents": 0, "offset": 0, "tokens": 0}
    try:
        state = storage.read_small_json(out / PROGRESS, "token store progress file")
    except storage.BadFile as e:
        raise DataError(f"{e}; remove {out} and prepare again") from None
    if not isinstance(state, dict):
        raise DataError(f"{out / PROGRESS} is {json_kind(state)}, not an object; remove {out} and prepare again")
    differs = [k for k in wanted if state.get(k) != wanted[k]]
    if differs:
        raise DataError(
            f"{out} holds an unfinished store of another {', '.join(differs)} (or the source changed since); pass another --out, or remove it"
        )
    _check_shards(state.get("shards"), f"{out / PROGRESS}", f"remove {out} and prepare again")
    for key in ("documents", "offset", "tokens"):
        if not _whole(state.get(key)):
            raise DataError(
                f"{out / PROGRESS}: {key!r} is {shown(state.get(key))}, not a whole number; remove {out} and prepare again"
            )
    for shard in state["shards"]:  # a shard is recorded only once renamed into place; still check
        path = out / shard["file"]
        problem = _shard_problem(path, shard["tokens"] * np.dtype(state["dtype"]).itemsize)
        if problem:
            raise DataError(f"{path} {problem}, which does not match {out / PROGRESS}; remove {out} and prepare again")
    return state


def _tokenise(out: Path, state: dict, tokenizer_json: str, workers: int, progress: bool) -> Store:
    from tqdm.auto import tqdm

    budget, written = state["budget"], state["tokens"]
    skip_docs, skip_tokens = state["documents"], state["offset"]
    docs = itertools.islice(iter_documents(state["spec"], state["text_field"]), skip_docs, None)
    writer = _ShardWriter(out, state["shard_tokens"], state)
    bar = tqdm(
        total=budget,
        initial=written,
        unit="tok",
        unit_scale=True,
        desc=f"tokenising {state['spec']}",
        disable=not progress,
        smoothing=0.1,
    )
    index, started, exhausted = skip_docs, time.perf_counter(), True
    sep, has_text = state["separator"], False  # a token besides the separators (empty documents give only those)
    try:
        for flat, lengths in _encoded(docs, tokenizer_json, state["separator"], state["dtype"], workers):
            for tokens in np.split(flat, np.cumsum(lengths)[:-1]):
                already = skip_tokens if index == skip_docs else 0
                if budget is not None and written + len(tokens) - already >= budget:
                    tokens = tokens[: already + budget - written]
                    exhausted = False
                has_text = has_text or bool(np.any(tokens[already:] != sep))
                writer.write_document(tokens, index, already)
                bar.update(len(tokens) - already)
                written += len(tokens) - already
                index += 1
                if not exhausted:
                    break
            if not exhausted:
                break
        writer.close((index, 0))
    except BaseException as e:
        writer.abandon()
        bar.close()
        if isinstance(e, OSError) and storage.is_disk_full(e):
            raise storage.disk_full_error(
                out, "a token store shard", state["shard_tokens"] * np.dtype(state["dtype"]).itemsize
            ) from None
        raise
    bar.close()
    if not has_text:  # nothing new this time: what an interrupted prepare wrote before may hold some
        has_text = any(
            s["tokens"] and np.any(np.memmap(out / s["file"], dtype=state["dtype"], mode="r") != sep) for s in state["shards"]
        )
    if not has_text:
        raise DataError(
            f"{state['spec']} holds no text to train on (no tokens after tokenising, or only the separators of empty "
            "documents); pass data that contains text"
        )
    if budget is not None and exhausted and written < budget:
        _warn(f"{state['spec']} ran out at {written:,} tokens, before the budget of {budget:,}; the store holds what there was")
    index_doc = {k: v for k, v in state.items() if k not in ("offset",)}
    index_doc.update(tokens=written, exhausted=exhausted, seconds=round(time.perf_counter() - started, 3))
    _write_json(out / INDEX, index_doc)
    (out / PROGRESS).unlink(missing_ok=True)
    return Store(out)


def cached_store(
    spec: str, tokenizer, cache_root: Path, *, text_field: str = "text", budget: int | None = None, **kwargs
) -> Store:
    """The trainer's store for a data spec: prepared once under `cache_root/<key>` (key: the spec's source
    key, the tokenizer, the budget), then opened. A finished store is opened as is; an interrupted one is
    continued."""
    return prepare_or_open(
        store_dir(spec, tokenizer, cache_root, text_field, budget),
        spec,
        tokenizer,
        text_field=text_field,
        budget=budget,
        **kwargs,
    )


def store_dir(spec: str, tokenizer, cache_root: Path, text_field: str = "text", budget: int | None = None) -> Path:
    """Where `cached_store` keeps a spec's tokens: derived without reading the documents, so every rank
    finds the same store while only one prepares it."""
    h = hashlib.sha256(
        f"smollm_ref-store-v{STORE_FORMAT}\0{source_key(spec, text_field)}\0{tokenizer_fingerprint(tokenizer)}\0{separator_id(tokenizer)}\0{budget}".encode()
    )
    return Path(cache_root) / h.hexdigest()[:32]


def prepare_or_open(directory: Path, spec: str, tokenizer, **kwargs) -> Store:
    if (directory / INDEX).is_file():
        return Store(directory)
    return prepare(spec, directory, tokenizer, **kwargs)
