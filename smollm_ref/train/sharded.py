"""FSDP2's optimizer state through `torch.distributed.checkpoint` (DCP, what PyTorch and torchtitan use): every
rank writes its shard of AdamW's moments into a checkpoint's `optimizer/` folder, and a run on any number of ranks
reads back the shards it holds now (DCP reshards on load). The folder holds tensors only; the param groups
(hyperparameters, plain values) travel in trainer_state.pt.

A checkpoint may come from anyone, and DCP reads its `.metadata` with `pickle.load` (and would read a non-tensor
item with `torch.load(weights_only=False)`): here the metadata is read first by an unpickler that builds DCP's
own metadata classes and nothing else, and a folder whose metadata names a non-tensor item or a file outside the
folder is refused, before DCP reads anything."""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from .options import SharedRefusal, TrainError

DIR = "optimizer"  # the folder in a checkpoint
METADATA = ".metadata"  # DCP's index of the folder's shards

# what DCP's metadata pickles (torch 2.13): its dataclasses, torch.Size, dtypes and layouts, the checkpoint's path
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_metadata(directory: Path, fix: str = "resume from another checkpoint") -> Metadata:
    """The DCP metadata of the sharded optimizer state in `directory`, checked: built from DCP's own classes only,
    every item a tensor, every shard a plain file name in `directory` that is a regular file. Raises TrainError
    (one line naming the folder, ending with `fix`) otherwise."""
    where = f"{directory / METADATA}"
    try:
        with open(directory / METADATA, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise TrainError(f"{where} is missing: the sharded optimizer state is incomplete; {fix}") from None
    except Exception as e:  # whatever a bad pickle raises (UnpicklingError, EOFError, KeyError, RecursionError, ...)
        raise TrainError(f"{where} is not the index of a sharded optimizer state ({type(e).__name__}: {e}); {fix}") from None
    if not (
        isinstance(metadata, Metadata)
        and isinstance(metadata.state_dict_metadata, dict)
        and isinstance(metadata.storage_data, dict)
    ):
        raise TrainError(f"{where} holds a {type(metadata).__name__}, not DCP metadata; {fix}")
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata) or not isinstance(item.size, torch.Size):
            raise TrainError(f"{where}: item {key!r} is not a tensor; {fix}")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        if not plain or getattr(info, "transform_descriptors", None):
            raise TrainError(f"{where} names {name!r}, which is not a plain shard in {directory}; {fix}")
        if not (directory / name).is_file() or (directory / name).is_symlink():
            raise TrainError(
                f"{where} names the shard {name}, which {directory} lacks: a rank wrote it elsewhere (a node that does not "
                f"share the run directory's file system) or it was lost; {fix}"
            )
    return metadata


class _Reader(dcp.FileSystemReader):
    """DCP's file reader, with its metadata read by `read_metadata` instead of `pickle.load`."""

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never falls back to per-rank metadata files
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _moments(state: dict) -> dict:
    """`get_optimizer_state_dict`'s per-parameter state ({fqn: {step, exp_avg, exp_avg_sq}}), tensors only."""
    for fqn, values in state.items():
        for key, value in values.items():
            if not torch.is_tensor(value):
                raise TypeError(
                    f"optimizer state {fqn}.{key} is a {type(value).__name__}; a sharded checkpoint holds tensors only"
                )
    return state


@contextlib.contextmanager
def _alone():
    """Whether DCP runs without a process group (one process, --fsdp without torchrun), and in that case without
    the warning DCP gives for it (it is what this run asked for)."""
    alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with warnings.catch_warnings():
        if alone:
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process", category=UserWarning)
        yield alone


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> list[dict]:
    """Write the optimizer's state of `model` (FSDP2's DTensor shards, or whole tensors in one process) into
    `directory` with DCP; a collective: every rank calls it, each writes its own shard file, rank 0 the metadata.
    Returns the param groups (parameters named by their fully qualified names), for trainer_state.pt. Raises
    DCP's CheckpointException (on every rank) when a rank fails to write."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    with _alone() as no_dist:
        dcp.save({"state": _moments(state["state"])}, storage_writer=dcp.FileSystemWriter(directory), no_dist=no_dist)
    return state["param_groups"]


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path, param_groups: list[dict]) -> None:
    """Load the state `save_optimizer` wrote into `directory`, resharded to how this run holds `model` (any number
    of ranks; a collective); `param_groups`: what it returned. The metadata is checked first (`read_metadata`).
    Raises TrainError (one line naming the folder) for metadata that does not fit this model, and SharedRefusal for
    shards DCP cannot read (a damaged or truncated file whose manifest entry was rewritten to match): DCP hands a
    rank's failure to every rank, so every rank refuses alike, before the optimizer is touched."""
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    metadata = read_metadata(directory)
    # AdamW's state, initialised (zero moments) and sharded as this run holds the parameters: DCP fills it in place
    state = get_optimizer_state_dict(model, optimizer)
    target = {"state": _moments(state["state"])}
    want = {f"state.{fqn}.{key}": tuple(v.shape) for fqn, values in target["state"].items() for key, v in values.items()}
    have = {key: tuple(item.size) for key, item in metadata.state_dict_metadata.items()}
    if want != have:
        differ = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise TrainError(
            f"the sharded optimizer state in {directory} does not fit this model ({len(differ)} item(s) differ, "
            f"e.g. {differ[0]}); resume from a checkpoint of this model"
        )
    try:
        with _alone() as no_dist:
            dcp.load(target, storage_reader=_Reader(directory), no_dist=no_dist)
    except CheckpointException as e:  # a BaseException whose text is every rank's traceback
        rank, (error, _) = min(e.failures.items())
        what = " ".join(f"{type(error).__name__}: {error}".split())
        raise SharedRefusal(
            f"the sharded optimizer state in {directory} cannot be read (rank {rank}: {what}); resume from another checkpoint"
        ) from None
    set_optimizer_state_dict(model, optimizer, {"state": target["state"], "param_groups": param_groups})
