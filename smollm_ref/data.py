"""Training data: documents -> tokens (tokenised once, cached, memory-mapped) -> deterministic batches.

A data *spec* is one of:
  - `stdlib` (default): the Python standard library that ships with every Python, nothing to download.
    Its modules are laid out as SmolLM2's code data is (`<repo_name>` + `<file_sep>` per package,
    `<filename>` for single modules) and its documentation topics (`pydoc_data.topics`) are prose
    documents, the two shuffled together so code and prose mix through the stream;
  - a text file, a directory, or a glob of files (code files get a `<filename>` header, others are plain);
  - a `.jsonl` file with one JSON object per line, the document in its `text` field (or `text_field`);
  - `hf:ORG/NAME[@SPLIT]`: a Hugging Face dataset, streamed or from the local cache (needs `datasets`).

Documents are joined with `<|endoftext|>` and tokenised once into a uint16 file under the cache,
keyed by the documents' content and the tokenizer, so a second run (or another rank) maps it at once.
The last `val_fraction` of the tokens is held out for validation. Training reads non-overlapping
windows of seq_len + 1 tokens in an order fixed by the seed; the position in that order (sequences
consumed so far) is all a checkpoint needs to continue the stream exactly.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import storage

FORMAT_VERSION = 1  # bump when the document layout changes, so old caches are not reused
DEFAULT_DATA = "stdlib"
CODE_SUFFIXES = frozenset(".py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .rb .sh .lua .jl .swift .kt .scala .sql".split())


class DataError(ValueError):
    """Unusable training data; the message says what is wrong and what to do."""


# ---- documents ---------------------------------------------------------------------------------------------


def _stdlib_documents() -> list[str]:
    """The standard library's modules (tests excluded: they are repetitive and large) and its doc topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    packages: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts) or any(p.startswith("test_") for p in rel.parts):
            continue
        packages.setdefault(rel.parts[0] if len(rel.parts) > 1 else "", []).append(path)
    docs = []
    for package, files in sorted(packages.items()):
        texts = [(f.relative_to(root).as_posix(), f.read_text(encoding="utf-8", errors="replace")) for f in files]
        if package:  # repository-level layout, as in StarCoder2 / Stack-Edu
            docs.append(f"<repo_name>cpython/Lib/{package}" + "".join(f"<file_sep>{name}\n{text}" for name, text in texts))
        else:
            docs.extend(f"<filename>{name}\n{text}" for name, text in texts)
    from pydoc_data.topics import topics

    docs.extend(topics[key].strip() + "\n" for key in sorted(topics))
    # A fixed shuffle (independent of the training seed, so the token cache is shared between seeds)
    # spreads prose among the code and makes the held-out tail a sample of both.
    random.Random(FORMAT_VERSION).shuffle(docs)
    return docs


def _file_document(path: Path, root: Path | None) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None  # binary files in a directory are skipped, not fed to the tokenizer
    if "\x00" in text:
        return None
    if path.suffix in CODE_SUFFIXES:
        name = path.relative_to(root).as_posix() if root else path.name
        return f"<filename>{name}\n{text}"
    return text


def _jsonl_documents(path: Path, field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno} is not JSON ({e.msg}); fix the line or pass a plain text file") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path} line {lineno} has no {field!r} field; set --text-field to the field holding the text")
            docs.append(str(record[field]))
    return docs


def _hf_documents(name: str, field: str, max_chars: int) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the Hugging Face dataset {name!r} needs the `datasets` package: pip install datasets") from None
    name, _, split = name.partition("@")
    try:
        stream = datasets.load_dataset(name, split=split or "train", streaming=True)
        docs, total = [], 0
        for record in stream:
            if field not in record:
                raise DataError(f"dataset {name!r} has no {field!r} field (it has {sorted(record)}); set --text-field")
            docs.append(str(record[field]))
            total += len(docs[-1])
            if total >= max_chars:
                break
    except DataError:
        raise
    except Exception as e:  # offline, unknown name, gated: datasets raises many classes
        raise DataError(
            f"could not read Hugging Face dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "check the name, the network or HF_DATASETS_OFFLINE with a local cache, or pass a local file"
        ) from None
    return docs


def read_documents(spec: str, text_field: str = "text", max_chars: int = 200_000_000) -> list[str]:
    """The documents of a data spec (see the module docstring), in a fixed order."""
    if spec == DEFAULT_DATA:
        return _stdlib_documents()
    if spec.startswith("hf:"):
        return _hf_documents(spec[3:], text_field, max_chars)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        docs = [_file_document(p, path) for p in files]
    elif path.is_file():
        if path.suffix in (".jsonl", ".ndjson"):
            return _jsonl_documents(path, text_field)
        docs = [_file_document(path, None)]
        if docs[0] is None:
            raise DataError(f"data file {path} is not UTF-8 text; pass a text file, a .jsonl file or a directory")
    elif any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data glob {spec!r} matches no files; check the pattern")
        docs = [_file_document(p, None) for p in files]
    else:
        raise DataError(f"data path {spec} does not exist; pass a file, a directory, a glob, hf:NAME or {DEFAULT_DATA}")
    return [d for d in docs if d is not None]


# ---- tokens ------------------------------------------------------------------------------------------------


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


def _cache_key(docs: list[str], tokenizer) -> str:
    h = hashlib.sha256(
        f"smollm_ref-tokens-v{FORMAT_VERSION}\0{tokenizer_fingerprint(tokenizer)}\0{separator_id(tokenizer)}\0".encode()
    )
    for doc in docs:
        h.update(hashlib.sha256(doc.encode("utf-8", errors="surrogatepass")).digest())
    return h.hexdigest()[:32]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_to_cache(docs: list[str], tokenizer, cache_root: Path, progress: bool = True) -> Path:
    """Tokenise `docs` (each followed by the separator) into `cache_root/<key>.bin` unless it is already there.
    Written to a temporary file and renamed, so a crash never leaves a partial cache that looks finished."""
    key = _cache_key(docs, tokenizer)
    path = cache_root / f"{key}.bin"
    if path.exists() and path.with_suffix(".json").exists():
        return path
    from tqdm.auto import tqdm

    cache_root.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer))
    sep = separator_id(tokenizer)
    storage.sweep_stale(cache_root, "", ".tmp")  # temporaries of tokenisers that were killed
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    n_tokens, chunk = 0, 64
    try:
        with (
            open(tmp, "wb") as f,
            tqdm(total=sum(len(d) for d in docs), unit="char", unit_scale=True, desc="tokenising", disable=not progress) as bar,
        ):
            for start in range(0, len(docs), chunk):
                batch = docs[start : start + chunk]
                for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                    arr = np.asarray(ids + [sep], dtype=dtype)
                    f.write(arr.tobytes())
                    n_tokens += arr.size
                bar.update(sum(len(d) for d in batch))
            f.flush()
            os.fsync(f.fileno())
        meta = {"tokens": n_tokens, "dtype": dtype.name, "documents": len(docs), "separator": sep, "format": FORMAT_VERSION}
        path.with_suffix(".json").write_text(json.dumps(meta) + "\n")
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and storage.is_disk_full(e):
            needed = sum(len(d) for d in docs) // 2 * dtype.itemsize  # about 2 characters a token
            raise storage.disk_full_error(cache_root, "the token cache", needed) from None
        raise
    tmp.replace(path)
    return path


def load_tokens(path: Path) -> np.ndarray:
    meta = json.loads(path.with_suffix(".json").read_text())
    if meta["tokens"] == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))


# ---- batches -----------------------------------------------------------------------------------------------


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
