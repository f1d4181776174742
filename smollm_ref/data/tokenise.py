"""Preparing a token store (the format: `store.py`): a data spec tokenised once, by several processes, into
shards, resumable after an interruption; `cached_store`, the trainer's store of a spec under the cache.

Documents stream through in bounded batches (never the corpus in memory), a long document in pieces of at
most `PIECE_CHARS` characters cut where the tokens cannot change (`cut_points`); workers tokenise batches in
parallel and the results are written in document order, so the tokens do not depend on the worker count.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .. import storage
from ..console import say
from ..storage import shown
from .sources import DataError, iter_documents, json_kind, source_key
from .store import (
    INDEX,
    PROGRESS,
    STORE_FORMAT,
    Store,
    check_shards,
    separator_id,
    shard_problem,
    shown_count,
    token_dtype,
    tokenizer_fingerprint,
    vocab_size,
)

DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MB of uint16
BATCH_DOCS, BATCH_CHARS = 256, 1 << 20  # documents per task: bounded by count and by characters

PIECE_CHARS = 1 << 20  # the most characters tokenised at once: the tokenizer needs ~130 bytes per character

# A cut at i, between a character that is not whitespace and one that is, is a pre-token boundary of GPT-2's
# byte-level regex (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`): no
# alternative takes whitespace after a non-whitespace character. The regex has no look-behind, so the text
# after the cut pre-tokenises as it does inside the whole; its only look-ahead, `(?!\S)`, ends a whitespace
# run, and the text before the cut ends in none, so that part pre-tokenises as it does inside the whole
# too. SmolLM2's Digits split (each digit alone) runs first and only ever adds cuts. BPE never merges across
# pre-tokens, so the pieces' tokens, concatenated, are the whole document's tokens. On the left, characters
# some regex engine may count as whitespace are excluded (Python's \s plus Unicode White_Space and the
# zero-width ones); on the right, only characters every engine counts.
_SAFE_CUT = re.compile(r"[^\s\x1c-\x1f\x85\xa0\u1680\u180e\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff][ \t\n\r]")


def exact_pieces(tokenizer_json: str) -> bool:
    """Whether `_SAFE_CUT` boundaries keep a tokenizer's tokens exact: no normalizer, GPT-2's byte-level regex
    (alone or after a Digits split) with no prefix space, a BPE model without dropout, and added tokens that
    neither hold whitespace nor strip it from their neighbours (they are matched before pre-tokenising)."""
    spec = json.loads(tokenizer_json)
    pre = spec.get("pre_tokenizer") or {}
    stages = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [s for s in stages if s.get("type") == "ByteLevel"]
    return (
        spec.get("normalizer") is None
        and len(byte_level) == 1
        and stages[-1] is byte_level[0]
        and byte_level[0].get("use_regex", True)
        and not byte_level[0].get("add_prefix_space", False)
        and all(s.get("type") == "Digits" for s in stages[:-1])
        and (spec.get("model") or {}).get("type") == "BPE"
        and not (spec.get("model") or {}).get("dropout")
        and not any(
            a.get("lstrip") or a.get("rstrip") or a.get("single_word") or any(c.isspace() for c in a.get("content", ""))
            for a in spec.get("added_tokens", [])
        )
    )


def cut_points(doc: str, limit: int, keep_whole: tuple[str, ...] = ()) -> list[tuple[int, bool]]:
    """Where to cut `doc` into pieces of at most `limit` characters: (position, whether the cut is a
    `_SAFE_CUT` boundary) in increasing order; none for a document of `limit` characters or fewer.

    Each cut is the last `_SAFE_CUT` boundary in the second half of the limit. A stretch of `limit / 2`
    characters with no such boundary (a long line without spaces) is cut at the limit itself, moved to the
    start (or end) of any `keep_whole` string (the tokenizer's added tokens) it would split: the pre-token
    there is then tokenised in two parts, so the tokens next to that cut may differ from the whole document's.
    """
    if limit < 2:
        raise ValueError(f"piece limit must be at least 2 characters, got {limit}")
    cuts, start = [], 0
    while len(doc) - start > limit:
        last = None
        for match in _SAFE_CUT.finditer(doc, start + limit // 2, start + limit + 1):
            last = match
        if last is not None:
            cut, safe = last.start() + 1, True
        else:
            cut, safe = _keep_whole(doc, start, start + limit, keep_whole), False
            if cut >= len(doc):
                break
        cuts.append((cut, safe))
        start = cut
    return cuts


def _keep_whole(doc: str, start: int, cut: int, keep_whole: tuple[str, ...]) -> int:
    """`cut`, moved back to the start of a `keep_whole` string it would split (or past one that begins at
    `start`, so that every piece has characters)."""
    for _ in range(len(keep_whole) + 1):
        moved = cut
        for token in keep_whole:
            at = doc.rfind(token, max(start, cut - len(token) + 1), cut + len(token) - 1)
            if at != -1 and at < cut < at + len(token):
                moved = at if at > start else at + len(token)
                break
        if moved == cut:
            return cut
        cut = moved
    return cut


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a process per core; no thread pool inside each
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode(batch: list[str], ends: list[bool], sep: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch of pieces -> (their tokens, the separator after each piece that ends a document, concatenated;
    tokens per piece)."""
    encodings = _WORKER_TOKENIZER.encode_batch(batch, add_special_tokens=False)
    tail = [[sep] if end else [] for end in ends]
    lengths = np.array([len(e.ids) + len(t) for e, t in zip(encodings, tail)], dtype=np.int64)
    flat = np.fromiter(
        itertools.chain.from_iterable(e.ids + t for e, t in zip(encodings, tail)), dtype=dtype, count=int(lengths.sum())
    )
    del encodings
    _release_memory()
    return flat, lengths


def _release_memory() -> None:
    """Hand freed heap back to the system. One multi-megabyte piece makes the tokenizer allocate hundreds of
    MB; glibc keeps that after it is freed, so every worker would otherwise sit at its worst piece's size for
    the rest of the run."""
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


def _batches(docs: Iterable[str], cuts: _Cuts) -> Iterator[tuple[list[str], list[bool]]]:
    """Pieces of documents (see `_Cuts.pieces`) in batches bounded by count and by characters, with whether each
    piece ends its document."""
    batch, ends, chars = [], [], 0
    for doc in docs:
        for piece, end in cuts.pieces(doc):
            batch.append(piece)
            ends.append(end)
            chars += len(piece)
            if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield batch, ends
                batch, ends, chars = [], [], 0
        cuts.document += 1
    if batch:
        yield batch, ends


class _Cuts:
    """Cuts documents into pieces for `_batches` (see `cut_points`), counting the cuts that may change tokens
    and the documents they were in."""

    def __init__(self, tokenizer_json: str, first_document: int):
        self.exact = exact_pieces(tokenizer_json)
        self.keep_whole = tuple(a["content"] for a in json.loads(tokenizer_json).get("added_tokens", []) if a.get("content"))
        self.document, self.inexact, self.inexact_docs, self.first_inexact = first_document, 0, 0, None

    def pieces(self, doc: str) -> Iterator[tuple[str, bool]]:
        """(piece, whether it ends the document)."""
        cuts = cut_points(doc, PIECE_CHARS, self.keep_whole) if len(doc) > PIECE_CHARS else []
        inexact = sum(not (safe and self.exact) for _, safe in cuts)
        if inexact:
            self.inexact, self.inexact_docs = self.inexact + inexact, self.inexact_docs + 1
            self.first_inexact = self.document if self.first_inexact is None else self.first_inexact
        start = 0
        for cut, _ in cuts:
            yield doc[start:cut], False
            start = cut
        yield doc[start:], True


def _encoded(
    batches: Iterable[tuple[list[str], list[bool]]], tokenizer_json: str, sep: int, dtype: str, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray, list[bool]]]:
    """Encoded batches in order, with each piece's end-of-document flag; at most 2 x workers batches in
    flight (bounded memory)."""
    if workers <= 1:
        global _WORKER_TOKENIZER
        from tokenizers import Tokenizer

        _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)
        for batch, ends in batches:
            yield (*_encode(batch, ends, sep, dtype), ends)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer_json,)) as pool:
        pending = deque()
        for batch, ends in batches:
            pending.append((pool.apply_async(_encode, (batch, ends, sep, dtype)), ends))
            if len(pending) >= 2 * workers:
                result, ends = pending.popleft()
                yield (*result.get(), ends)
        while pending:
            result, ends = pending.popleft()
            yield (*result.get(), ends)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share, not the
    machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def check_workers(workers: int) -> int:
    """`workers` if this process can run that many tokenising processes at once; else `DataError`: more
    processes than cores only multiply memory (each holds a tokenizer and its batches) and slow every one."""
    cores = usable_cores()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataError(f"--workers must be a whole number of processes >= 1, got {workers!r}")
    if workers > cores:
        raise DataError(
            f"--workers {workers} is more than the {cores} core(s) this process may use; pass --workers {cores} or fewer"
        )
    return workers


class _ShardWriter:
    """Appends documents' tokens to shards of exactly `shard_tokens` (the last may be shorter). Each finished
    shard is fsynced, renamed into place and recorded in progress.json with the stream position it ends at:
    (documents written whole, tokens of the next document already written)."""

    def __init__(self, out: Path, shard_tokens: int, progress: dict):
        self.out, self.shard_tokens, self.progress = out, shard_tokens, progress
        self.file = self.hash = self.tmp = None
        self.count = 0

    def write(self, tokens: np.ndarray, index: int, start: int, ends: bool) -> None:
        """Tokens `start:start + len(tokens)` of document `index`; `ends`: they are its last."""
        done = start
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
                self.close((index + 1, 0) if ends and not len(tokens) else (index, done))

    def close(self, position: tuple[int, int]) -> None:
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        name = self.tmp.name.split(".tmp")[0]
        self.tmp.replace(self.out / name)
        self.progress["shards"].append({"file": name, "tokens": self.count, "sha256": self.hash.hexdigest()})
        self.progress["documents"], self.progress["offset"] = position
        self.progress["tokens"] = sum(s["tokens"] for s in self.progress["shards"])
        _write_json(self.out / PROGRESS, self.progress)

    def abandon(self) -> None:
        if self.file is not None:
            try:
                self.file.close()  # may fail again on a full disk: the temporary goes all the same
            except OSError:
                pass
            self.file = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def _warn(message: str) -> None:
    say(f"warning: {message}")


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(value, indent=1) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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
    restart: bool = False,
    wait: bool = False,
) -> Store:
    """Tokenise `spec` into a store at `out` (see the module docstring), or finish an interrupted prepare of
    the same spec, tokenizer and budget there. `budget` stops after that many tokens (None: all of them);
    `workers` tokenising processes (None: every usable core; more is refused).

    One writer per store: `out/.lock` is held from before anything there is read until the end. Another
    prepare holding it: `DataError`, or with `wait` (the trainer's cache) wait for it and open what it made.
    An unfinished prepare of other inputs in `out` is refused, or with `restart` its shards are discarded.
    Raises `DataError` (one line) for every refusal, and for a full disk or an unwritable `out`, leaving no
    temporary behind (finished shards of a full disk are kept: run it again with room to continue)."""
    if budget is not None and budget <= 0:
        raise DataError(f"the token budget must be a positive number of tokens, got {budget}")
    workers = check_workers(usable_cores() if workers is None else workers)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; pass a directory")
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
        "piece_chars": PIECE_CHARS,
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "source": tokenizer_source},
    }
    finished = f"{out} already holds a finished token store; pass another --out, or remove it to prepare again"
    if (out / INDEX).is_file() and not wait:  # a finished store is never written again: no lock needed to say so
        raise DataError(finished)
    not_a_store = f"--out {out} is a directory that is not a token store; pass a new or empty directory"
    if out.is_dir() and any(not p.name.startswith(("shard_", ".", PROGRESS, INDEX)) for p in out.iterdir()):
        raise DataError(not_a_store)  # said before the lock, so that no .lock is left among someone's files
    created = _first_missing(out)
    lock = _lock(out, wait)
    try:
        if (out / INDEX).is_file():
            if wait:
                return Store(out)  # the prepare we waited for finished it
            raise DataError(finished)
        # the lock is ours: every temporary left here is a killed writer's
        storage.sweep_stale(out, "shard_", ".tmp", all_dead=True)
        storage.sweep_stale(out, ".", ".tmp", all_dead=True)
        if any(p.name != storage.DirectoryLock.NAME for p in out.iterdir()) and not (out / PROGRESS).is_file():
            raise DataError(not_a_store)
        state = _resume_state(out, wanted, restart)
        try:
            return _tokenise(out, state, backend.to_str(), workers, progress, vocab_size(tokenizer))
        except _StaleProgress as e:  # raised before this run wrote anything
            _refuse_or_discard(out, f"{out / PROGRESS} is not a progress record of this source: {e}", restart)
            return _tokenise(out, _fresh(wanted), backend.to_str(), workers, progress, vocab_size(tokenizer))
    except BaseException:
        lock.release()
        lock = None
        if created is not None and not (out / PROGRESS).is_file() and not (out / INDEX).is_file():
            shutil.rmtree(created, ignore_errors=True)  # nothing of ours worth keeping: leave no trace
        raise
    finally:
        if lock is not None:
            lock.release()


def _first_missing(out: Path) -> Path | None:
    """The outermost directory of `out`'s path that does not exist yet (None: `out` exists)."""
    missing = None
    for path in (out, *out.parents):
        if path.exists():
            break
        missing = path
    return missing


def _unwritable(out: Path, e: OSError) -> DataError:
    if storage.is_disk_full(e):
        return DataError(
            f"no space left on the device holding {out}; free some space, or pass another --out "
            "(the trainer's cache: set SMOLLM_REF_CACHE to another place)"
        )
    why = {
        errno.EROFS: "it is on a read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of its path is a file, not a directory",
    }.get(e.errno, e.strerror or str(e))
    return DataError(
        f"cannot write the token store at {out}: {why}; pass a writable directory as --out "
        "(the trainer's cache: set SMOLLM_REF_CACHE to one)"
    )


def _lock(out: Path, wait: bool) -> storage.DirectoryLock:
    created = _first_missing(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = storage.DirectoryLock(out)
        try:
            return lock.acquire()
        except storage.LockedError as e:
            if not wait:
                raise DataError(
                    f"{e}: another prepare is writing this token store; wait for it to finish, or pass another --out"
                ) from None
            _warn(f"{e}: waiting for it to finish preparing this token store")
            return lock.acquire(wait=True)
    except OSError as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise _unwritable(out, e) from None


def _fresh(wanted: dict) -> dict:
    return {**wanted, "shards": [], "documents": 0, "offset": 0, "tokens": 0}


def _resume_state(out: Path, wanted: dict, restart: bool) -> dict:
    if not (out / PROGRESS).is_file():
        return _fresh(wanted)
    problem = None
    try:
        state = storage.read_small_json(out / PROGRESS, "progress file")
    except storage.BadFile as e:
        state, problem = None, str(e)
    if problem is None:
        problem = _progress_problem(out, state, wanted)
    if problem is None:
        return state
    _refuse_or_discard(out, problem, restart)
    return _fresh(wanted)


def _refuse_or_discard(out: Path, problem: str, restart: bool) -> None:
    """`DataError` saying `problem` of the unfinished store at `out`; with `restart`, its shards and progress
    file are removed instead."""
    if not restart:
        raise DataError(f"{problem}; pass another --out, remove {out}, or pass --restart to discard its shards and start again")
    _warn(f"{problem}; --restart: its shards are discarded")
    for path in out.glob("shard_*.bin"):
        path.unlink()
    (out / PROGRESS).unlink()


def _progress_problem(out: Path, state, wanted: dict) -> str | None:
    """Why an unfinished prepare's progress cannot be continued with `wanted` (None: it can)."""
    where = out / PROGRESS
    if not isinstance(state, dict):
        return f"{where} is {json_kind(state)}, not an object"
    differs = [k for k in wanted if state.get(k) != wanted[k]]
    if differs:
        return f"{out} holds an unfinished store of another {', '.join(differs)} (or the source changed since)"
    try:
        check_shards(state.get("shards"), str(where), "")
    except DataError as e:
        return str(e)
    for key in ("documents", "offset", "tokens"):
        value = state.get(key)
        if not (storage.is_int(value) and value >= 0):
            return f"{where}: {key!r} is {shown(value)}, not a whole number"
    problem = _totals_problem(state)
    if problem:
        return f"{where} is not a progress record of its shards: {problem}"
    itemsize = np.dtype(wanted["dtype"]).itemsize
    for shard in state["shards"]:  # a shard is recorded only once renamed into place; still check
        path = out / shard["file"]
        problem = shard_problem(path, shard["tokens"] * itemsize)
        if problem:
            return f"{path} {problem}, which does not match {where}"
    return None


def _totals_problem(state: dict) -> str | None:
    """What in a progress record's totals `_ShardWriter` never writes (None: nothing): it records a shard only
    once full (the last may be shorter: one finished but not yet indexed), then the sum of the shards' tokens,
    the documents written whole (each at least its separator) and the tokens of the next already written."""
    shards, size = state["shards"], state["shard_tokens"]
    tokens, documents, offset = state["tokens"], state["documents"], state["offset"]
    held = sum(shard["tokens"] for shard in shards)
    if tokens != held:
        return f"'tokens' is {shown_count(tokens)} but its {len(shards)} shard(s) hold {held:,}"
    for i, shard in enumerate(shards):
        if shard["tokens"] > size or (shard["tokens"] < size and i < len(shards) - 1) or shard["tokens"] == 0:
            return f"shards[{i}] holds {shard['tokens']:,} tokens, not the {size:,} of a full shard"
    if documents + offset > tokens:
        return (
            f"{shown_count(documents)} document(s) and {shown_count(offset)} token(s) of the next cannot fit in {tokens:,} tokens"
        )
    if state["budget"] is not None and tokens > state["budget"]:
        return f"'tokens' is {tokens:,}, more than the budget of {state['budget']:,}"
    return None


class _StaleProgress(DataError):
    """A progress record whose stream position the source does not reach: found only while reading it."""


def _skip(docs: Iterator[str], count: int, spec: str) -> Iterator[str]:
    """`docs` past its first `count`; `_StaleProgress` if it holds fewer (read before anything is written)."""
    for seen in range(count):
        if next(docs, None) is None:
            raise _StaleProgress(
                f"{spec} holds {seen:,} document(s), fewer than the {shown_count(count)} its progress record has consumed"
            )
    return docs


def _tokenise(out: Path, state: dict, tokenizer_json: str, workers: int, progress: bool, vocab: int) -> Store:
    from tqdm.auto import tqdm

    budget, written = state["budget"], state["tokens"]
    skip_docs, skip_tokens = state["documents"], state["offset"]
    docs = _skip(iter(iter_documents(state["spec"], state["text_field"])), skip_docs, state["spec"])
    cuts = _Cuts(tokenizer_json, skip_docs)
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
    index, at, started, exhausted = skip_docs, 0, time.perf_counter(), True  # at: tokens of document `index` seen
    sep, has_text = state["separator"], False  # a token besides the separators (empty documents give only those)
    try:
        for flat, lengths, ends in _encoded(_batches(docs, cuts), tokenizer_json, state["separator"], state["dtype"], workers):
            for tokens, end in zip(np.split(flat, np.cumsum(lengths)[:-1]), ends):
                # an earlier prepare wrote the first `skip_tokens` tokens of its last document
                already = min(len(tokens), max(0, skip_tokens - at)) if index == skip_docs else 0
                new = tokens[already:]
                if budget is not None and written + len(new) >= budget:
                    new, exhausted = new[: budget - written], False
                has_text = has_text or bool(np.any(new != sep))
                writer.write(new, index, at + already, end and exhausted)
                bar.update(len(new))
                written += len(new)
                if not exhausted:
                    break
                at += len(tokens)
                if end and index == skip_docs and at < skip_tokens:  # nothing of it was written this time
                    raise _StaleProgress(
                        f"document {index:,} of {state['spec']} has {at:,} tokens, fewer than the {shown_count(skip_tokens)} its progress record has written"
                    )
                if end:
                    index, at = index + 1, 0
            if not exhausted:
                break
        if exhausted and index == skip_docs and skip_tokens:
            raise _StaleProgress(
                f"{state['spec']} ends before document {index:,}, of which its progress record has written {shown_count(skip_tokens)} tokens"
            )
        writer.close((index, at) if exhausted else (index + 1, 0))  # a document cut by the budget is consumed
        bar.close()
        _finish(out, state, cuts, has_text, exhausted, written, time.perf_counter() - started, vocab)
    except BaseException as e:
        writer.abandon()
        bar.close()
        if isinstance(e, OSError):
            if storage.is_disk_full(e):
                need = storage.size(state["shard_tokens"] * np.dtype(state["dtype"]).itemsize)
                kept = len(state["shards"])
                raise DataError(
                    f"no space left on the device holding {out} while writing the token store ({storage.size(storage.free_bytes(out))} free, "
                    f"a shard needs up to {need}); {kept} finished shard(s) are kept: free some space, or pass a smaller --shard-tokens, "
                    "and run the same command again to continue"
                ) from None
            raise _unwritable(out, e) from None
        raise
    return Store(out)


def _finish(
    out: Path, state: dict, cuts: _Cuts, has_text: bool, exhausted: bool, written: int, seconds: float, vocab: int
) -> None:
    """After the last shard: refuse a store without text (removing its shards), warn of a short corpus or
    inexact cuts, write the index and drop the progress record."""
    sep, budget = state["separator"], state["budget"]
    if not has_text:  # nothing new this time: what an interrupted prepare wrote before may hold some
        has_text = any(
            s["tokens"] and np.any(np.memmap(out / s["file"], dtype=state["dtype"], mode="r") != sep) for s in state["shards"]
        )
    if not has_text:  # no store to continue either: remove every shard and the progress file
        for shard in state["shards"]:
            (out / shard["file"]).unlink(missing_ok=True)
        (out / PROGRESS).unlink(missing_ok=True)  # then `prepare` removes the directory if it created it
        raise DataError(
            f"{state['spec']} holds no text to train on (no tokens after tokenising, or only the separators of empty "
            "documents); pass data that contains text"
        )
    if budget is not None and exhausted and written < budget:
        _warn(f"{state['spec']} ran out at {written:,} tokens, before the budget of {budget:,}; the store holds what there was")
    if cuts.inexact:
        _warn(
            f"{cuts.inexact_docs:,} document(s) (the first: document {cuts.first_inexact:,}, counting from 0) were cut into pieces of at most "
            f"{PIECE_CHARS:,} characters at {cuts.inexact:,} place(s) where "
            + (
                "this tokenizer may tokenise a cut differently from the whole document"
                if not cuts.exact
                else "no whitespace came for more than half that; the tokens next to each such cut may differ from tokenising the document whole"
            )
        )
    index_doc = {k: v for k, v in state.items() if k not in ("offset",)}
    index_doc.update(tokens=written, exhausted=exhausted, seconds=round(seconds, 3))
    index_doc["tokenizer"] = {**state["tokenizer"], "vocab_size": vocab}
    _write_json(out / INDEX, index_doc)
    (out / PROGRESS).unlink(missing_ok=True)


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
    """A cache directory's store: opened when finished, else prepared under its lock. Another process
    preparing it is waited for; an unfinished prepare there of other inputs (an older smollm_ref's) is
    discarded, as the directory belongs to the cache, not to the user."""
    if (directory / INDEX).is_file():
        return Store(directory)
    return prepare(spec, directory, tokenizer, wait=True, restart=True, **kwargs)
