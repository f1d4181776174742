"""Where training text comes from: a data spec, read as a stream of documents (never all in memory).

A data *spec* is one of:
  - `stdlib` (default): the Python standard library that ships with every Python, nothing to download.
    Its modules are laid out as SmolLM2's code data is (`<repo_name>` + `<file_sep>` per package,
    `<filename>` for single modules) and its documentation topics (`pydoc_data.topics`) are prose
    documents, the two shuffled together so code and prose mix through the stream;
  - a text file, a directory, or a glob of files (code files get a `<filename>` header, `.jsonl` files are
    read as below, others are plain);
  - a `.jsonl` file with one JSON object per line, the document in its `text` field (or `text_field`);
  - `hf:PATH[:CONFIG][@SPLIT]`: a Hugging Face dataset, streamed: PATH is a Hub id or anything
    `datasets.load_dataset` reads locally (a folder of parquet / JSON / arrow files, a dataset repo
    folder), CONFIG a configuration name, SPLIT default `train`; e.g.
    `hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2`;
  - a directory written by `python -m smollm_ref.data prepare` (a token store; see `store.py`).

`source_key` identifies a spec's content without reading it (file names, sizes and modification times;
a Hub id by name), so every rank agrees on the token store without streaming the corpus. Chat and preference
specs (`stdlib-chat`, `stdlib-preferences`, a .jsonl file or hf:...) are read as records instead (`iter_records`).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import random
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import storage

FORMAT_VERSION = 1  # bump when the document layout changes, so old caches are not reused
DEFAULT_DATA = "stdlib"
CHAT_DATA = "stdlib-chat"  # the embedded chat set (questions on the standard library answered from its docs)
PREFERENCE_DATA = "stdlib-preferences"  # the embedded preference set (a question's documented answer over another's)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CODE_SUFFIXES = frozenset(".py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .rb .sh .lua .jl .swift .kt .scala .sql".split())


class DataError(ValueError):
    """Unusable training data; the message says what is wrong and what to do."""


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


def _jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of every non-blank line. A line that is not UTF-8 or not JSON (nesting
    too deep included) is an error naming the file and the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path} line {lineno} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "convert the file to UTF-8 or remove the line"
                ) from None
            if not line.strip():
                continue
            try:
                yield lineno, storage.loads_json(line, f"{path} line {lineno}")
            except storage.BadFile as e:
                raise DataError(f"{e}; fix the line") from None


def json_kind(value) -> str:
    """What a parsed JSON (or dataset) value is, in the words of JSON: "null", "a number", "an array", ..."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"), (dict, "an object"))
    return next((kind for types, kind in kinds if isinstance(value, types)), f"a {type(value).__name__}")


def _text_of(record, field: str, where: str) -> str:
    """`record[field]` when it is a string. A null, a number, a list or an object there is refused rather
    than trained as its Python repr ("None", "[...]"): such a value is a mistake in the data or the field."""
    value = record[field]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} is {json_kind(value)}, not a string; fix the record or set --text-field to the field holding the text"
        )
    return value


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for lineno, record in _jsonl_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{path} line {lineno} is {json_kind(record)}, not an object with a {field!r} field; fix the line")
        if field not in record:
            raise DataError(f"{path} line {lineno} has no {field!r} field; set --text-field to the field holding the text")
        yield _text_of(record, field, f"{path} line {lineno}")


@dataclass(frozen=True)
class HFSpec:
    """`hf:PATH[:CONFIG][@SPLIT]`."""

    path: str
    config: str | None
    split: str

    @classmethod
    def parse(cls, spec: str) -> HFSpec:
        body = spec.removeprefix("hf:")
        body, at, split = body.rpartition("@") if "@" in body else (body, "", "train")
        path, colon, config = body.rpartition(":")
        if not colon or not path or "/" in config:  # no configuration (or a ':' inside a path)
            path, config = body, ""
        if not path or not split:
            raise DataError(
                f"data spec {spec!r} is not hf:PATH[:CONFIG][@SPLIT]; e.g. hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2"
            )
        return cls(path, config or None, split)

    def __str__(self) -> str:
        return f"hf:{self.path}{':' + self.config if self.config else ''}@{self.split}"


def _hf_records(spec: HFSpec):
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the Hugging Face dataset {spec} needs the `datasets` package: pip install datasets") from None
    try:
        return datasets.load_dataset(spec.path, spec.config, split=spec.split, streaming=True)
    except Exception as e:  # offline, unknown name or configuration, gated: datasets raises many classes
        raise DataError(_hf_error(spec, e)) from None


def _hf_error(spec: HFSpec, e: Exception) -> str:
    first = (str(e).splitlines() or [""])[0][:200]
    local = Path(spec.path).expanduser().exists()
    # what datasets raises for a split without records (it never yields, or arrow refuses an empty file)
    if isinstance(e, StopIteration) or "greater than 0, got 0" in first or "file size is 0 bytes" in first:
        return f"dataset {spec} has no records; check the configuration and split"
    if spec.config and ("config" in first.lower() or "builderconfig" in first.lower()):
        try:
            import datasets

            names = datasets.get_dataset_config_names(spec.path)
            return f"dataset {spec.path!r} has no configuration {spec.config!r}; it has {', '.join(names)}"
        except Exception:
            pass
    if (
        "bad split" in first.lower()
        or "unknown split" in first.lower()
        or ("split" in first.lower() and "not found" in first.lower())
    ):
        return f"dataset {spec.path!r} has no split {spec.split!r} ({first}); pick one with @SPLIT"
    offline = any(w in first.lower() for w in ("offline", "connection", "resolve", "network", "couldn't reach", "max retries"))
    if not local and offline:
        return (
            f"could not reach the Hugging Face Hub for dataset {spec.path!r} ({first}); with no network, download it where there "
            f"is one and pass the folder instead (hf:/path/to/{spec.path.split('/')[-1]}{':' + spec.config if spec.config else ''}), "
            "or set HF_DATASETS_OFFLINE=1 to use the local cache"
        )
    return (
        f"could not read Hugging Face dataset {spec} ({type(e).__name__}: {first}); check the name, the configuration, "
        "the network or HF_DATASETS_OFFLINE with a local cache, or pass a local folder"
    )


def _hf_documents(spec: HFSpec, field: str) -> Iterator[str]:
    stream = _hf_records(spec)
    count = 0
    try:
        for record in stream:
            if field not in record:
                raise DataError(f"dataset {spec} has no {field!r} field (it has {', '.join(sorted(record))}); set --text-field")
            count += 1
            yield _text_of(record, field, f"dataset {spec} record {count}")
    except DataError:
        raise
    except Exception as e:
        raise DataError(_hf_error(spec, e)) from None
    if count == 0:
        raise DataError(f"dataset {spec} has no records; check the configuration and split")


def _local_files(spec: str) -> tuple[list[Path], Path | None]:
    """The files of a file, directory or glob spec, and the root their names are relative to."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        return files, path
    if path.is_file():
        return [path], None
    if path.exists():  # a FIFO or a device (/dev/zero): no end, or nothing to read
        raise DataError(f"data path {spec} is not a regular file or a directory; pass a file, a directory, a glob or hf:NAME")
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data glob {spec!r} matches no files; check the pattern")
        return files, None
    raise DataError(f"data path {spec} does not exist; pass a file, a directory, a glob, hf:NAME or {DEFAULT_DATA}")


def iter_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """The documents of a data spec (see the module docstring), in a fixed order, one at a time."""
    if spec == DEFAULT_DATA:
        yield from _stdlib_documents()
        return
    if spec.startswith("hf:"):
        yield from _hf_documents(HFSpec.parse(spec), text_field)
        return
    files, root = _local_files(spec)
    if len(files) == 1 and root is None and files[0].suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(files[0], text_field)
        return
    if len(files) == 1 and root is None:
        doc = _file_document(files[0], None)
        if doc is None:
            raise DataError(f"data file {files[0]} is not UTF-8 text; pass a text file, a .jsonl file or a directory")
        yield doc
        return
    for path in files:
        if path.suffix in JSONL_SUFFIXES:  # shards of a corpus: their text fields, never the JSON around them
            yield from _jsonl_documents(path, text_field)
            continue
        doc = _file_document(path, root)
        if doc is not None:
            yield doc


def read_documents(spec: str, text_field: str = "text") -> list[str]:
    """All documents of a small spec as a list (tests, quick looks); training streams `iter_documents`."""
    return list(iter_documents(spec, text_field))


def source_key(spec: str, text_field: str = "text") -> str:
    """A fingerprint of what `spec` holds, computed without reading the documents: for local files their
    names, sizes and modification times; for the standard library the Python that ships it; for a Hub
    dataset its name, configuration, split and field."""
    h = hashlib.sha256(f"smollm_ref-docs-v{FORMAT_VERSION}\0{spec}\0{text_field}\0".encode())
    if spec in (DEFAULT_DATA, CHAT_DATA, PREFERENCE_DATA):
        h.update(f"{sys.version}\0{sysconfig.get_paths()['stdlib']}".encode())
        return h.hexdigest()[:32]
    if spec.startswith("hf:"):
        hf = HFSpec.parse(spec)
        local = Path(hf.path).expanduser()
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
    else:
        files, root = _local_files(spec)
        if (len(files) > 1 or root is not None) and any(p.suffix in JSONL_SUFFIXES for p in files):
            # their .jsonl files were once read as plain text: a store of those tokens must not be reused
            h.update(b"jsonl-records-in-directories\0")
    for path in files:
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:32]


def iter_records(spec: str) -> Iterator[object]:
    """The raw records of a chat or preference spec: `stdlib-chat`, `stdlib-preferences`, a .jsonl file, or hf:...
    (for chat each should be an object holding `messages`; one that is not is passed on as it is, for
    `chat.messages_of` to refuse)."""
    for _, record in located_records(spec):
        yield record


def located_records(spec: str) -> Iterator[tuple[str, object]]:
    """`iter_records` with where each record is, for messages: `PATH line N` for a .jsonl file,
    `dataset SPEC record N` for hf:..., `stdlib-chat record N` (`stdlib-preferences record N`)."""
    if spec in (CHAT_DATA, PREFERENCE_DATA):
        from . import stdlib_chat, stdlib_preferences

        embedded = stdlib_chat if spec == CHAT_DATA else stdlib_preferences
        for number, record in enumerate(embedded.records(), 1):
            yield f"{spec} record {number}", record
        return
    if spec.startswith("hf:"):
        hf = HFSpec.parse(spec)
        try:
            for number, record in enumerate(_hf_records(hf), 1):
                yield f"dataset {hf} record {number}", dict(record)
        except DataError:
            raise
        except Exception as e:
            raise DataError(_hf_error(hf, e)) from None
        return
    path = Path(spec).expanduser()
    if not (path.is_file() and path.suffix in JSONL_SUFFIXES):
        raise DataError(
            f'chat data {spec} must be a .jsonl file of {{"messages": [...]}} records, hf:PATH with a messages column, or {CHAT_DATA}'
        )
    for lineno, record in _jsonl_records(path):
        yield f"{path} line {lineno}", record


def looks_like_chat(spec: str) -> bool:
    """Whether a spec holds conversations: the embedded chat set, or a first record with `messages`."""
    if spec == CHAT_DATA:
        return True
    if spec == DEFAULT_DATA:
        return False
    path = Path(spec).expanduser()
    if not spec.startswith("hf:") and not (path.is_file() and path.suffix in JSONL_SUFFIXES):
        return False
    first = next(iter_records(spec), None)
    return isinstance(first, dict) and "messages" in first
