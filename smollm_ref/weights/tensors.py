"""State dicts in and out: a transformers directory's tensors (safetensors, sharded safetensors or
pytorch_model.bin) read and checked against the config they are for and the free memory, loaded into a
model (`load_into`: the one rule for tied embeddings; `from_directory`), and written back as transformers reads them (`save_pretrained`)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import stat
from pathlib import Path

import torch

from .. import storage
from ..config import ModelConfig
from ..model import LlamaForCausalLM
from .sources import SourceError


def check_regular(path: Path, what: str) -> None:
    """Weights are read from regular files only: opening a FIFO blocks until a writer comes, and a device
    such as /dev/zero never ends. FileNotFoundError passes through (see `reading`)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise SourceError(f"{path} is not a regular file (a FIFO, device or directory); give a {what} that is one")


def read_state_dict(directory: Path, config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint directory: model.safetensors, sharded safetensors with an
    index, or pytorch_model*.bin (read with weights_only=True: pickled code is refused). Given the `config`
    they are for, the model's size is checked against free memory and the tensor names and shapes against
    the safetensors headers before any tensor is read (`check_fits_memory`, `check_shapes`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if config is not None:
        check_fits_memory(config)
    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        check_regular(f, "safetensors file")
    if files:
        if config is not None:
            shapes = {}
            for f in files:
                with reading(f, "safetensors file"), safe_open(f, "pt") as sf:
                    shapes.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
            check_shapes(config, shapes, directory)
        state = {}
        for f in files:
            with reading(f, "safetensors file"):
                state.update(load_file(f))
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            check_regular(f, "PyTorch weights file")
            with reading(f, "PyTorch weights file"):
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        if config is not None:
            check_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, directory)
        return state
    if not directory.is_dir():  # removed while being read (a pruned checkpoint): the caller may look again
        raise FileNotFoundError(2, "No such file or directory", str(directory))
    raise SourceError(f"{directory} has a config.json but no model.safetensors or pytorch_model.bin")


@contextlib.contextmanager
def reading(path: Path, what: str):
    """Whatever a weights reader raises on a damaged or hostile file becomes a one-line SourceError.
    FileNotFoundError passes through: a checkpoint pruned under a reader is retried (`checkpoint.load_latest`)."""
    try:
        yield
    except (FileNotFoundError, SourceError):
        raise
    except pickle.UnpicklingError:  # torch's message advises loading the file unsafely: not repeated here
        raise SourceError(
            f"{path} is not a readable {what}: it holds pickled objects other than tensors, which are never "
            "loaded (weights_only=True); convert it to safetensors where it can be trusted"
        ) from None
    except Exception as e:
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        raise SourceError(f"{path} is not a readable {what} ({reason})") from None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the state dict of a model with this config, from a model built on
    the meta device (no memory), so the shapes are the model's own."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source) -> None:
    """Raise SourceError unless the tensors named in `shapes` are those a model of `config` has, with the
    same shapes; a missing lm_head.weight is left to `load_into`'s tying rule."""
    expected = expected_shapes(config)
    for name, shape in shapes.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in expected:
            raise SourceError(
                f"checkpoint {source} does not fit its config: it has a tensor {name} that a model of that config "
                f"lacks (config: {config.num_hidden_layers} layers)"
            )
        if tuple(shape) != expected[name]:
            raise SourceError(
                f"checkpoint {source} does not fit its config: tensor {name} has shape {list(shape)} in the "
                f"weights, the config implies {list(expected[name])}"
            )
    missing = [k for k in expected if k not in shapes and k != "lm_head.weight"]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise SourceError(f"checkpoint {source} does not fit its config: the weights lack {missing[0]}{more}")


def check_fits_memory(config: ModelConfig, bytes_per_parameter: int = 4) -> None:
    """Raise SourceError if a model of `config` (float32 while it is built and loaded) would not fit in
    the memory left: a small config.json can describe a model of any size."""
    need = config.num_parameters() * bytes_per_parameter
    free = storage.available_memory()
    if free is not None and need > free:
        raise SourceError(
            f"a model of this config has {config.num_parameters() / 1e9:.2f}B parameters, about {need / 1e9:.1f} GB "
            f"in float32, but only {free / 1e9:.1f} GB of memory is available; check the config's sizes "
            f"(hidden_size {config.hidden_size}, {config.num_hidden_layers} layers, vocab_size {config.vocab_size})"
        )


def load_into(model: LlamaForCausalLM, state: dict[str, torch.Tensor]) -> None:
    """Load `state` with strict=True. The one rule for a missing lm_head.weight: with tied embeddings it *is*
    the embedding (transformers omits it when saving tied models); untied, it is an error."""
    state = dict(state)
    if "lm_head.weight" not in state:
        if not model.config.tie_word_embeddings:
            raise SourceError("checkpoint has no lm_head.weight but the config says tie_word_embeddings=false")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    elif model.config.tie_word_embeddings and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
        raise SourceError("config says tie_word_embeddings=true but lm_head.weight differs from the embedding")
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # old transformers saved it
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:2]
        raise SourceError(f"checkpoint does not fit the config: {' '.join(first)}") from None


def from_directory(
    directory: Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> LlamaForCausalLM:
    """A model from a transformers directory (config.json and weights), its config checked against the
    weights' headers and the free memory before the model is allocated (see `read_state_dict`)."""
    config = ModelConfig.from_json(Path(directory) / "config.json")
    return to_model(config, read_state_dict(Path(directory), config), dtype, device)


def to_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype, device) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config)
    load_into(model, state)
    model.to(device=device or "cpu", dtype=dtype or torch.float32)
    return model.eval()


def save_pretrained(model: LlamaForCausalLM, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write `config.json` + `model.safetensors` (+ tokenizer files) that transformers'
    `AutoModelForCausalLM.from_pretrained(directory)` loads as the same model."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    dtypes = {p.dtype for p in model.parameters()}
    config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # safetensors refuses shared storage; transformers re-ties on load
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    storage.follow_umask(directory / "model.safetensors")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
