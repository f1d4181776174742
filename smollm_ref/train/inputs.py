"""What a run is built from, checked before anything is written: the run directory, the model's config
and starting weights, the tokenizer, and the token windows for training and validation."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import checkpoint, data, distributed, storage
from ..config import ModelConfig
from ..storage import DirectoryLock, LockedError
from .logger import say
from .options import DEFAULT_MODEL, DEFAULT_TOKENIZER, TrainConfig, TrainError


def check_out_dir(cfg: TrainConfig, resuming: bool, d: distributed.Dist) -> tuple[bool, DirectoryLock | None]:
    """Refuse an existing run directory unless resuming or --overwrite; create it and take its lock (one
    trainer per run directory; the main rank holds it). Returns whether the directory had to be created (so a
    failed setup can remove it again) and the lock. Every rank checks before any rank writes there:
    otherwise a later rank sees rank 0's new directory."""
    out = Path(cfg.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out-dir {out} is a file, not a directory; pass another --out-dir")
    existing = out.is_dir() and any(p.name != DirectoryLock.NAME for p in out.iterdir())
    if existing and not resuming:
        if not cfg.overwrite:
            raise TrainError(
                f"run directory {out} already exists; pass --resume auto to continue it, --overwrite to replace it, or another --out-dir"
            )
        markers = ("metrics.jsonl", "checkpoints", checkpoint.TRAIN_CONFIG)
        if not any((out / m).exists() for m in markers):
            raise TrainError(f"--overwrite refused: {out} does not look like a run directory (no metrics.jsonl or checkpoints/)")
    distributed.barrier(d)
    if not d.is_main:
        return False, None
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(out).acquire()
    except LockedError as e:
        raise TrainError(f"{e}; wait for it to finish, or pass another --out-dir") from None
    except OSError as e:
        raise TrainError(f"cannot write to --out-dir {out} ({e.strerror or e}); pass a writable directory") from None
    return created, lock


def sweep_temporaries(run_dir: Path) -> list[Path]:
    """Half-written checkpoints of killed runs (`.tmp-step_*`, `.old-step_*`, a slimmed state's temporary).
    The caller holds the run's lock, so no live writer owns any of them."""
    root = checkpoint.checkpoints_root(run_dir)
    removed = storage.sweep_stale(root, ".tmp-step_", "-", all_dead=True) + storage.sweep_stale(
        root, ".old-step_", "-", all_dead=True
    )
    for _, path in checkpoint.list_checkpoints(root):
        removed += storage.sweep_stale(path, ".", ".tmp", all_dead=True)
    return removed


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove the old run's files, keeping the lock this process holds."""
    for path in run_dir.iterdir():
        if path.name == DirectoryLock.NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def model_and_weights(cfg: TrainConfig, resume_dir: Path | None) -> tuple[ModelConfig, dict | None]:
    """The model's config and the weights to start from (None: fresh initialisation)."""
    from ..weights import check_fits_memory, from_pretrained, read_state_dict

    explicit = ModelConfig.from_name(cfg.model_config) if cfg.model_config else None
    if resume_dir is not None:
        saved = ModelConfig.from_json(resume_dir / "config.json")
        if explicit is not None and explicit != saved:
            diff = [
                f"{f.name} {getattr(saved, f.name)} vs {getattr(explicit, f.name)}"
                for f in dataclasses.fields(ModelConfig)
                if getattr(saved, f.name) != getattr(explicit, f.name)
            ]
            raise TrainError(
                f"checkpoint {resume_dir} holds a model of another shape ({', '.join(diff[:3])}); pass the matching --model-config or another --resume"
            )
        # sizes against memory, shapes against the safetensors header, before any tensor is read
        return saved, checkpoint.strip_compile_prefix(read_state_dict(resume_dir, saved))
    if cfg.init_from:
        model = from_pretrained(cfg.init_from)
        if explicit is not None and explicit != model.config:
            raise TrainError(
                f"--model-config {cfg.model_config} differs from the model of --init-from {cfg.init_from}; drop --model-config"
            )
        return model.config, dict(model.state_dict())
    config = explicit or ModelConfig.from_name(DEFAULT_MODEL)
    # model + AdamW's two moments + gradients, float32: refused with its size before anything is allocated
    check_fits_memory(config, bytes_per_parameter=16)
    return config, None


def load_tokenizer(cfg: TrainConfig, resume_dir: Path | None):
    """--tokenizer, else the checkpoint's or --init-from model's own, else SmolLM2's."""
    from ..tokenizer import from_directory, load_tokenizer
    from ..weights import SourceError

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    # the checkpoint to resume was verified when it was chosen: read its files, not its hashes once more
    for source, load in ((resume_dir, from_directory), (cfg.init_from, load_tokenizer)):
        if source is None:
            continue
        try:
            return load(source)
        except SourceError:
            continue  # a model without tokenizer files: fall back to SmolLM2's own
    return load_tokenizer(DEFAULT_TOKENIZER)


@dataclass
class TokenData:
    train: data.Windows
    val: data.Windows
    key: str  # the token store's key, recorded in checkpoints
    budget: int | None  # the token budget the store was read to
    train_tokens: int
    val_tokens: int


def data_budget(cfg: TrainConfig, world_size: int, saved: dict | None) -> int | None:
    """How many tokens of --data to read: --data-tokens; else what a resumed run read; else, for a streamed
    hf: spec, what this run needs (every step's windows plus the validation share); else everything."""
    if cfg.data_tokens is not None:
        return cfg.data_tokens
    if saved is not None:
        return saved.get("data_budget")
    if not cfg.data.startswith("hf:"):
        return None
    train_tokens = cfg.max_steps * world_size * cfg.batch_size * cfg.grad_accum * cfg.seq_len + 1
    return math.ceil(train_tokens / (1 - cfg.val_fraction))


def token_data(cfg: TrainConfig, tokenizer, d: distributed.Dist, budget: int | None, vocab_size: int) -> TokenData:
    """The token store of --data (a prepared store as is; any other spec prepared once into the cache by
    the main rank while the others wait), split into training and validation windows of --seq-len + 1.
    A store written earlier is verified, and refused (`TrainError`) if it holds a token id the model's
    `vocab_size` embeddings lack; one prepared just now holds only the tokenizer's ids, which the caller
    has checked against the model."""
    fresh = False  # prepared just now: its shards were hashed as they were written
    if data.is_store(cfg.data):
        store = data.Store(cfg.data)
        store.check_tokenizer(tokenizer)
    else:
        from ..storage import cache_dir

        directory = data.store_dir(cfg.data, tokenizer, cache_dir() / "tokens", cfg.text_field, budget)
        if d.is_main:
            fresh = not (directory / data.store.INDEX).is_file()
            if fresh and budget is not None:
                say(f"streaming {cfg.data} until {budget / 1e6:.1f} M tokens")
            store = data.prepare_or_open(
                directory,
                cfg.data,
                tokenizer,
                text_field=cfg.text_field,
                budget=budget,
                workers=_workers(cfg.data),
                progress=cfg.progress,
            )
        distributed.barrier(d)
        if not d.is_main:
            store = data.Store(directory)
    if d.is_main and not fresh:
        top = store.verify()  # a store written earlier, or elsewhere: every shard against its checksum
        if top >= vocab_size:  # its index may predate the vocabulary size, or name another tokenizer's
            raise TrainError(
                f"token store {store.dir} holds token id {top:,}, but the model's vocabulary has {vocab_size:,} tokens "
                f"(ids 0 to {vocab_size - 1:,}); prepare the store again"
            )
    split = data.split_tokens(store.tokens(), cfg.seq_len, cfg.val_fraction, key=store.key)
    return TokenData(
        data.Windows(split.train, cfg.seq_len),
        data.Windows(split.val, cfg.seq_len),
        split.key,
        budget,
        len(split.train),
        len(split.val),
    )


def is_chat(cfg: TrainConfig) -> bool:
    if cfg.data_format != "auto":
        return cfg.data_format == "chat"
    return data.looks_like_chat(cfg.data)


def chat_data(cfg: TrainConfig, tokenizer):
    """Conversations encoded with the tokenizer's chat template (every rank encodes them: a chat set is small)."""
    from ..data.conversations import chat_data

    return chat_data(cfg.data, tokenizer, cfg.seq_len, cfg.val_fraction, pack=cfg.pack, too_long=cfg.too_long)


def _workers(spec: str) -> int:
    """All usable cores, except for a small local corpus, where starting worker processes costs more than it
    saves."""
    path = Path(spec).expanduser()
    if path.is_file() and path.stat().st_size < 16 << 20:
        return 1
    return data.store.usable_cores()


def eval_batches(n_windows: int, cfg: TrainConfig, d: distributed.Dist) -> list[list[int]]:
    """This rank's validation batches: the first windows, the same number of batches on every rank."""
    per_rank = min(cfg.eval_batches, n_windows // (cfg.batch_size * d.world_size))
    if per_rank == 0 and n_windows >= d.world_size:  # a small validation split: one short batch each
        size = n_windows // d.world_size
        return [list(range(d.rank * size, (d.rank + 1) * size))]
    return [
        list(range((b * d.world_size + d.rank) * cfg.batch_size, (b * d.world_size + d.rank + 1) * cfg.batch_size))
        for b in range(per_rank)
    ]


def check_step_memory(cfg: TrainConfig, model_config: ModelConfig, device) -> None:
    """Refuse a micro-batch whose activations cannot fit, or a step whose micro-batches cannot (they are built
    before it runs), before any batch is built. The bound is a floor:
    each layer keeps at least its input hidden states for the backward pass (2 bytes a value in bf16), and
    the batch itself is int64 inputs and targets; the step needs more than this, never less."""
    from ..storage import available_memory

    per_token = model_config.num_hidden_layers * model_config.hidden_size * 2 + 16
    need = cfg.batch_size * cfg.seq_len * per_token
    # a step's micro-batches are all built before it runs (`Run.next_batches`): int64 inputs and targets each
    step_batches = cfg.grad_accum * cfg.batch_size * (cfg.seq_len + 1) * 16
    if device.type == "cuda":
        import torch

        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory() if device.type == "cpu" else None
    if free is not None and need > free:
        raise TrainError(
            f"--batch-size {cfg.batch_size} x --seq-len {cfg.seq_len} needs at least {need / 1e9:,.1f} GB of activations "
            f"per micro-batch ({per_token} bytes a token or more), but {free / 1e9:,.1f} GB of memory is available on "
            f"{device}; pass a smaller --batch-size (and a larger --grad-accum to keep the tokens per step)"
        )
    if free is not None and step_batches > free:
        raise TrainError(
            f"--grad-accum {cfg.grad_accum} x --batch-size {cfg.batch_size} x --seq-len {cfg.seq_len} tokens are held "
            f"at once by a step's micro-batches, {step_batches / 1e9:,.1f} GB, but {free / 1e9:,.1f} GB of memory is "
            f"available; pass a smaller --grad-accum"
        )


def check_against_data(cfg: TrainConfig, token_data, d: distributed.Dist) -> None:
    """Options that the data must be able to honour: a micro-batch of distinct training rows, and held-out
    rows to validate on when --eval-every asks for validation."""
    rows = "rows" if not isinstance(token_data, TokenData) else f"windows of --seq-len + 1 = {cfg.seq_len + 1} tokens"
    n_train = len(token_data.train)
    if cfg.batch_size > n_train:
        raise TrainError(
            f"--batch-size {cfg.batch_size} is more sequences than the training split holds ({n_train:,} {rows}); "
            f"pass --batch-size <= {n_train} or more data"
        )
    if cfg.eval_every and not eval_batches(len(token_data.val), cfg, d):
        raise TrainError(
            f"--eval-every {cfg.eval_every} asks for validation, but the held-out split holds {len(token_data.val)} {rows} "
            f"(--val-fraction {cfg.val_fraction:g}; a corpus under two sequences keeps none back); pass --eval-every 0, "
            "or a --val-fraction > 0 with more data"
        )


def split_digest(token_data) -> dict:
    """What a run trains and validates on, by content: the number of training and held-out rows and a checksum
    of the held-out tokens. Saved in checkpoints, so a resume on other data (or another split of it) is refused
    whatever the store's key says (a moved or touched corpus has another key and the same tokens)."""
    h = hashlib.sha256()
    val = token_data.val
    if isinstance(token_data, TokenData):
        h.update(np.asarray(val.tokens, dtype=np.int64).tobytes())
    else:
        for rows in (val.input_ids, val.labels, val.position_ids or []):
            for row in rows:
                h.update(np.asarray(row, dtype=np.int64).tobytes() + b"|")
    return {"train": len(token_data.train), "val": len(val), "val_sha256": h.hexdigest()[:32]}


def describe_split_change(saved: dict, now: dict) -> str:
    said = [f"{now.get(k, 0):,} {k} rows, the run's {saved.get(k, 0):,}" for k in ("train", "val") if saved.get(k) != now.get(k)]
    if saved.get("val_sha256") != now.get("val_sha256"):
        said.append("other held-out tokens")
    return "; ".join(said)
