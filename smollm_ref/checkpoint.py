"""Checkpoints: one directory per step that transformers loads as is, plus the trainer's state to resume.

    RUN_DIR/checkpoints/step_000500/
        config.json, model.safetensors, tokenizer files   transformers.AutoModelForCausalLM.from_pretrained(dir)
        trainer_state.pt    optimizer, GradScaler, schedule, step, tokens, RNG states, data position, WandB id:
                            tensors and plain values only, read back with torch.load(weights_only=True)
        train_config.json   the run's options
        optimizer/          FSDP2 runs: the AdamW state, sharded as the ranks held it, written by every rank
                            with torch.distributed.checkpoint and resharded on load to any number of ranks
        manifest.json       SHA-256 of every file above (a folder's files as `optimizer/NAME`); written last,
                            so no manifest means no checkpoint

A LoRA run's checkpoint holds its adapter in peft's format (adapter_config.json, adapter_model.safetensors) and a
record of its base (lora_base.json) instead of model.safetensors: `smollm_ref.lora`.

A checkpoint is written into a temporary directory, every file fsynced, the manifest last, then renamed
into place: a crash leaves either the previous state or a complete checkpoint. On resume a checkpoint
whose manifest is missing or whose files do not match it is skipped with a warning.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from . import storage

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which and why."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_entry(path: Path) -> dict:
    """A manifest's record of one file: its SHA-256 and size."""
    return {"sha256": storage.sha256_file(path), "bytes": path.stat().st_size}


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(directory: str | Path) -> int | None:
    """The step a checkpoint directory is named for (`step_000200` -> 200); None for any other name."""
    m = _STEP_DIR.match(Path(directory).name)
    return int(m.group(1)) if m else None


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every finished-looking checkpoint directory under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := step_of(p)) is not None]
    return sorted(found)


def write(root: Path, step: int, write_files, keep_last: int | None = None) -> Path:
    """Create `root/step_NNNNNN` atomically. `write_files(tmp_dir)` writes the payload; the manifest is added
    here. Older checkpoints beyond the newest `keep_last` are then removed."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_files(tmp)
        files = payload_files(tmp)
        manifest = {"step": step, "files": {p.relative_to(tmp).as_posix(): file_entry(p) for p in files}}
        for p in files:
            _fsync(p)
        for folder in (p for p in tmp.iterdir() if p.is_dir()):
            _fsync(folder)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
    except BaseException:  # a full disk, a kill signal turned exception: leave no half-written directory
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step written again (e.g. interrupted right after a checkpoint)
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(root)
    if keep_last:
        for _, path in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def payload_files(directory: Path) -> list[Path]:
    """The files a checkpoint's manifest records: those in `directory` and in its folders, one level deep
    (`optimizer/`), in name order."""
    top = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    return top + sorted(f for d in directory.iterdir() if d.is_dir() and not d.is_symlink() for f in d.iterdir() if f.is_file())


def verify(directory: Path) -> None:
    """Raise CheckpointError unless `directory` holds a complete checkpoint matching its manifest."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"checkpoint {directory} has no {MANIFEST} (it was not finished)")
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} is not a regular file")
    manifest = read_manifest(directory)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(
            f"checkpoint {directory}: {MANIFEST} 'files' is a {type(files).__name__}, not a mapping of file names to checksums"
        )
    weights = "adapter_model.safetensors" if "adapter_config.json" in files else "model.safetensors"  # a LoRA run's: peft's files
    for name in ("config.json", weights, STATE):
        if name not in files:
            raise CheckpointError(f"checkpoint {directory} lacks {name}")
    for name, entry in files.items():
        _verify_file(directory, name, entry)


def read_manifest(directory: Path) -> dict:
    """The manifest of checkpoint `directory` as a dict, read as a small regular file (`storage.read_small_json`:
    a FIFO or a device is refused, not waited on or read without end). CheckpointError, one line, otherwise."""
    manifest = _read_object(directory, MANIFEST, "manifest")
    if manifest is None:
        raise CheckpointError(f"checkpoint {directory} has no {MANIFEST} (it was not finished)")
    return manifest


def _read_object(directory: Path, name: str, what: str) -> dict | None:
    """The JSON object in `directory / name` (None when absent), or a one-line CheckpointError."""
    try:
        value = storage.read_small_json(directory / name, what)
    except FileNotFoundError:
        return None
    except storage.BadFile as e:
        raise CheckpointError(f"checkpoint {directory} has an unreadable {name}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {directory} has an unreadable {name} ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint {directory}: {name} is a JSON {type(value).__name__}, not an object")
    return value


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _verify_file(directory: Path, name, entry) -> None:
    """One manifest entry: a plain file name in `directory` or in one of its folders (`optimizer/NAME`, the
    folder itself no link), a regular file (not a link, FIFO or device) of the recorded size, then its hash. A
    manifest is read from disk and may come from anyone, so nothing it names is opened outside the checkpoint,
    and nothing is read past the size it was checked to have."""
    parts = name.split("/") if isinstance(name, str) else [name]
    if not 1 <= len(parts) <= 2 or not all(_plain_name(part) for part in parts):
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} names {name!r}, which is not a file in the checkpoint")
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} has no sha256 for {name}")
    size = entry.get("bytes")  # manifests have always recorded it; a hand-made one may not
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} gives {name} a size of {size!r}, not a byte count")
    folder = None
    try:
        if len(parts) == 2:  # O_NOFOLLOW | O_DIRECTORY: a folder that is a link, or no folder, fails to open
            folder = os.open(directory / parts[0], os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
        # O_NOFOLLOW: a symlink fails to open; O_NONBLOCK: a FIFO opens without waiting for a writer.
        fd = os.open(
            parts[-1] if folder is not None else directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder
        )
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory} is missing {name}") from None
    except OSError:
        link = any(os.path.islink(directory.joinpath(*parts[:i])) for i in range(1, len(parts) + 1))
        kind = "a symbolic link" if link else "not readable"
        raise CheckpointError(f"checkpoint {directory}: {name} is {kind}, not a regular file") from None
    finally:
        if folder is not None:
            os.close(folder)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"checkpoint {directory}: {name} is not a regular file (a device, FIFO or directory)")
        if size is not None and st.st_size != size:
            raise CheckpointError(
                f"checkpoint {directory}: {name} has {st.st_size} bytes, its manifest says {size} (corrupt or half-written)"
            )
        digest = storage.sha256_file(f, limit=st.st_size)
    if digest != entry["sha256"]:
        raise CheckpointError(f"checkpoint {directory}: {name} does not match its checksum (corrupt or half-written)")


def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).exists() or (path / STATE).exists()


def latest_valid(root: Path) -> Path | None:
    """The newest checkpoint under `root` that verifies; each newer one that does not is reported."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
    return None


def find(path: str | Path) -> Path:
    """A checkpoint directory from a path that is a checkpoint, a run directory, or a `checkpoints/` folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"resume path {path} does not exist; pass a checkpoint directory, a run directory or 'auto'")
    if is_checkpoint(path):
        verify(path)
        return path
    for root in (checkpoints_root(path), path):
        if list_checkpoints(root):
            found = latest_valid(root)
            if found is None:
                raise CheckpointError(f"no usable checkpoint under {root}: every one is corrupt or unfinished")
            return found
    raise CheckpointError(f"{path} holds no checkpoint; pass a checkpoint directory (step_NNNNNN) or a run directory")


def load_latest(path: str | Path, load: Callable[[Path], T]) -> tuple[Path, T]:
    """(checkpoint directory, load(directory)) for the checkpoint `find(path)` picks. Readers take no lock,
    so a trainer writing to the same run can prune the verified checkpoint (keep_last) before `load` reads
    it: then the search runs once more, and a second loss is a CheckpointError, not a FileNotFoundError."""
    found = find(path)
    try:
        return found, load(found)
    except FileNotFoundError:
        pass  # pruned between verify and load: look again, once
    found = find(path)
    try:
        return found, load(found)
    except FileNotFoundError as e:
        raise CheckpointError(
            f"checkpoint {found} was removed while it was being read ({e.filename or e}), twice; a trainer "
            "is pruning this run's checkpoints: pass one it keeps, or try again"
        ) from None


def load_state(directory: Path, mmap: bool = False) -> dict:
    """A checkpoint's trainer_state.pt (tensors and plain values only); `mmap`: its tensors mapped, not read
    (to look at its plain values)."""
    return torch.load(directory / STATE, map_location="cpu", weights_only=True, mmap=mmap)


def load_train_config(directory: Path) -> dict:
    """The run options a checkpoint recorded ({} if it has none), read as a small regular file."""
    return _read_object(directory, TRAIN_CONFIG, "run options") or {}


def strip_compile_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved from a torch.compile'd module carries `_orig_mod.` in every key; drop it."""
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def rng_state() -> dict:
    """Python's, NumPy's, torch's and (where present) CUDA's RNG states, as tensors and plain values so that a
    checkpoint loaded with weights_only=True can read them back."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
