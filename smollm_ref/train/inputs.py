"""What a run is built from, checked before anything is written: the run directory, the model's config
and starting weights, the tokenizer, and the options its data must honour (the data itself is read by the
run's objective, `smollm_ref.train.objectives`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from .. import checkpoint, distributed, lora, metrics_file, storage
from ..config import ModelConfig
from ..storage import DirectoryLock, LockedError
from .options import (
    DEFAULT_MODEL,
    DEFAULT_TOKENIZER,
    CheckpointOptions,
    DataOptions,
    EvalOptions,
    LoraOptions,
    ModelOptions,
    SharedRefusal,
    TrainError,
    as_flag,
    divisors,
    option_fields,
)


def check_out_dir(options: CheckpointOptions, resuming: bool, d: distributed.Dist) -> tuple[bool, DirectoryLock | None]:
    """Refuse an existing run directory unless resuming or --overwrite; create it and take its lock (one
    trainer per run directory; the main rank holds it). Returns whether the directory had to be created (so a
    failed setup can remove it again) and the lock. Every rank checks before any rank writes there:
    otherwise a later rank sees rank 0's new directory."""
    out = Path(options.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out-dir {out} is a file, not a directory; pass another --out-dir")
    existing = out.is_dir() and any(p.name != DirectoryLock.NAME for p in out.iterdir())
    if existing and not resuming:
        if not options.overwrite:
            raise TrainError(
                f"run directory {out} already exists; pass --resume auto to continue it, --overwrite to replace it, or another --out-dir"
            )
        markers = (metrics_file.NAME, "checkpoints", checkpoint.TRAIN_CONFIG)
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


# Options that name a path, which may differ from node to node for the same run (another mount of it): the
# checkpoint resumed is compared by content instead, and under FSDP the run directory by `check_shared_run_dir`
# (under DDP rank 0 alone writes there)
PER_NODE = ("out_dir", "resume")


def check_same_options(options: dict, resume_dir: Path | None, d: distributed.Dist) -> None:
    """Every rank must train with the same `options` (`TrainConfig.to_dict()`; each node's ranks were started by a
    command of their own, and a rank that trains on other sizes, data or settings would not say so), except the
    paths of PER_NODE, and resume the same checkpoint `resume_dir` (its run state's SHA-256, as its manifest
    records it). A collective: every rank sends its own to every other. Raises SharedRefusal on every rank, naming
    the first rank and option that differ from rank 0's. A no-op for one process."""
    if not d.enabled:
        return
    mine = {name: value for name, value in options.items() if name not in PER_NODE}
    mine["checkpoint"] = _run_state_digest(resume_dir)
    first, *others = distributed.all_objects(d, mine)
    for rank, theirs in enumerate(others, start=1):
        name = next((name for name, value in first.items() if theirs.get(name) != value), None)
        if name is None:
            continue
        if name == "checkpoint":
            differs = f"resumes {theirs[name] or 'nothing (a new run)'}, rank 0 {first[name] or 'nothing (a new run)'}"
        else:
            differs = f"has {as_flag(name, theirs.get(name))}, rank 0 {as_flag(name, first[name])}"
        raise SharedRefusal(
            f"the processes were started with other options: rank {rank} {differs}; start every node with the same "
            "command (only --out-dir and --resume may name other paths to the same run directory and checkpoint)"
        )


def _run_state_digest(resume_dir: Path | None) -> str | None:
    """A checkpoint by content: its name and its run state's SHA-256 (as its manifest records it)."""
    if resume_dir is None:
        return None
    try:
        digest = checkpoint.read_manifest(resume_dir)["files"][checkpoint.STATE]["sha256"]
    except (checkpoint.CheckpointError, KeyError, TypeError):  # verified when it was found: not expected
        digest = storage.sha256_file(resume_dir / checkpoint.STATE)
    return f"{resume_dir.name} (run state {digest[:12]})"


def check_shared_run_dir(run_dir: Path, d: distributed.Dist, device) -> None:
    """Under FSDP every rank writes its shard of the optimizer state into the run directory's checkpoints, so every
    rank must see the files rank 0 writes there: one file system on every node. Rank 0 writes a file of a name
    drawn now (no node has looked it up before) and every rank looks for it; refused on every rank when one does
    not see it: SharedRefusal, which each node's first process prints. A no-op for one process. A
    collective: every rank calls it."""
    import secrets

    import torch

    if not d.enabled:
        return
    drawn = secrets.randbelow(2**62) + 1 if d.is_main else 0  # not the training RNG
    token = int(distributed.total(d, torch.tensor([drawn], dtype=torch.int64, device=device)).item())
    probe = run_dir / f".ranks-{token:x}"
    if d.is_main:
        probe.write_text(f"{os.getpid()}\n")
    distributed.barrier(d)
    blind = distributed.any_rank(d, not probe.is_file(), device)
    if d.is_main:
        probe.unlink(missing_ok=True)
    if blind:
        raise SharedRefusal(
            f"--fsdp: a rank does not see the files rank 0 writes in {run_dir} (its node has another file system there), "
            "and every rank writes its shard of the optimizer state into the checkpoints; put --out-dir on a file system "
            "every node shares"
        )


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


def model_and_weights(options: ModelOptions, resume_dir: Path | None) -> tuple[ModelConfig, dict | None]:
    """The model's config and the weights to start from (None: fresh initialisation)."""
    from ..weights import check_fits_memory, from_pretrained, read_config, read_state_dict

    explicit = read_config(options.model_config) if options.model_config else None
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
        if lora.LoraSpec.read(resume_dir) is not None:  # a LoRA run's: its base, rebuilt and checked by digest
            from ..weights import lora_base

            return saved, dict(lora_base(resume_dir).state_dict())
        # sizes against memory, shapes against the safetensors header, before any tensor is read
        return saved, checkpoint.strip_compile_prefix(read_state_dict(resume_dir, saved))
    if options.init_from:
        model = from_pretrained(options.init_from)
        if explicit is not None and explicit != model.config:
            raise TrainError(
                f"--model-config {options.model_config} differs from the model of --init-from {options.init_from}; drop --model-config"
            )
        return model.config, dict(model.state_dict())
    config = explicit or ModelConfig.from_name(DEFAULT_MODEL)
    # model + AdamW's two moments + gradients, float32: refused with its size before anything is allocated
    check_fits_memory(config, bytes_per_parameter=16)
    return config, None


def lora_spec(options: LoraOptions, model: ModelOptions, resume_dir: Path | None) -> lora.LoraSpec | None:
    """The run's LoRA adapters (None: every weight trains), refused in one line where they cannot run: under --fsdp,
    on a new run without --init-from, or against a checkpoint that holds another adapter, or none; and LoRA options
    given without --lora-rank."""
    spec = lora.LoraSpec.from_options(options)
    if spec is not None and model.fsdp:
        raise TrainError(
            "--lora-rank with --fsdp is not supported (FSDP2 sharding peft's adapter layers is untested); run LoRA under "
            "torchrun without --fsdp (DDP), or train every weight with --fsdp"
        )
    if resume_dir is not None:
        problem = lora.resume_problem(spec, resume_dir)
        if problem is not None:
            raise TrainError(problem)
    if spec is None:
        given = [f for f in dataclasses.fields(options)[1:] if getattr(options, f.name) != f.default]
        if given:
            value = getattr(options, given[0].name)
            shown = f"{value:g}" if isinstance(value, float) else value
            raise TrainError(
                f"--{given[0].name.replace('_', '-')} {shown} needs --lora-rank: LoRA is off at --lora-rank 0; pass --lora-rank N"
            )
    elif resume_dir is None and not model.init_from:
        raise TrainError(
            "--lora-rank needs --init-from: LoRA adapts pretrained weights, and its checkpoints record where the base came "
            "from instead of holding it; pass --init-from SOURCE, or leave out --lora-rank to train every weight"
        )
    return spec


def lora_adapter(spec: lora.LoraSpec | None, model: ModelOptions, resume_dir: Path | None, weights: dict) -> lora.Adapter | None:
    """The run's adapter: a resumed run's from its checkpoint (its base record and adapter weights), a new run's on
    the --init-from `weights` (their source and digest recorded, peft's initialisation)."""
    if spec is None:
        return None
    if resume_dir is not None:
        return lora.Adapter(spec, lora.Base.read(resume_dir), lora.read_adapter(resume_dir))
    from ..weights import local_path

    return lora.Adapter(spec, lora.Base(model.init_from, local_path(model.init_from), lora.weights_digest(weights)))


def load_tokenizer(options: ModelOptions, resume_dir: Path | None):
    """--tokenizer, else the checkpoint's or --init-from model's own, else SmolLM2's."""
    from ..tokenizer import from_directory, load_tokenizer
    from ..weights import SourceError

    if options.tokenizer:
        return load_tokenizer(options.tokenizer)
    # the checkpoint to resume was verified when it was chosen: read its files, not its hashes once more
    for source, load in ((resume_dir, from_directory), (options.init_from, load_tokenizer)):
        if source is None:
            continue
        try:
            return load(source)
        except SourceError:
            continue  # a model without tokenizer files: fall back to SmolLM2's own
    return load_tokenizer(DEFAULT_TOKENIZER)


def validation_rows(n_rows: int, eval_batches: int, batch_size: int, world_size: int) -> int:
    """The held-out rows a new run validates on, all ranks: the first --eval-batches x processes x --batch-size of
    the `n_rows`, fewer whole rounds of processes x --batch-size when the split is smaller, and when not one round
    fits, n_rows // processes rows a process (0 when the split holds fewer rows than processes)."""
    rounds = min(eval_batches, n_rows // (batch_size * world_size))
    return rounds * batch_size * world_size if rounds else n_rows // world_size * world_size


def kept_validation_rows(
    n_rows: int, eval_options: EvalOptions, batch_size: int, d: distributed.Dist, saved: dict | None, saved_options: dict, where
) -> int:
    """The held-out rows this run validates on, all ranks (`eval_batches`): a new run's `validation_rows`; a resumed
    run's are its run's (the `val_rows` of its run state `saved`, or for a checkpoint from before it was recorded,
    the `validation_rows` of its processes, --batch-size and --eval-batches in `saved_options`), so that a resume
    on other processes or with another --batch-size validates on the same rows, unless --eval-batches changes.
    Raises TrainError naming the checkpoint `where` for a recorded count that is not a whole number up to
    `n_rows`, and SharedRefusal (one line) when validation is on and the rows do not split evenly over the
    processes."""
    fresh = validation_rows(n_rows, eval_options.eval_batches, batch_size, d.world_size)
    defaults = {name: option_fields()[name].field.default for name in ("eval_batches", "batch_size")}
    if saved is None or saved_options.get("eval_batches", defaults["eval_batches"]) != eval_options.eval_batches:
        return fresh
    kept = saved.get("val_rows")
    if kept is None:
        size = saved_options.get("batch_size", defaults["batch_size"])
        kept = validation_rows(n_rows, eval_options.eval_batches, size, int(saved.get("world_size", 1)))
    elif not storage.is_int(kept) or not 0 <= kept <= n_rows:
        raise TrainError(
            f"checkpoint {where} holds val_rows {kept!r} in its run state, not an integer from 0 to the {n_rows:,} held-out "
            "rows; resume from another checkpoint"
        )
    if kept == 0:  # its run had fewer held-out rows than processes: nothing to keep
        return fresh
    if kept % d.world_size and eval_options.eval_every:
        raise SharedRefusal(
            f"cannot resume {where} on {d.world_size} process(es) validating on its rows: the run validates on the first "
            f"{kept:,} held-out rows, which do not split evenly over {d.world_size} process(es); resume on {divisors(kept)} "
            f"process(es), pass --eval-batches N to validate on other rows from here on, or --eval-every 0"
        )
    return kept


def eval_batches(val_rows: int, batch_size: int, d: distributed.Dist) -> list[list[int]]:
    """This rank's validation batches of the first `val_rows` held-out rows (all ranks, a multiple of the
    processes): batch j of rank r is rows (j x processes + r) x size onward, `size` the largest divisor of a
    process's share that is at most --batch-size. Every batch the same size, the mean of the batches' mean losses
    is the mean over the rows however many processes read them (at a fixed size: --eval-batches batches of
    --batch-size, as before)."""
    share = val_rows // d.world_size
    if share == 0:
        return []
    size = max(k for k in range(1, min(batch_size, share) + 1) if share % k == 0)
    first = [(j * d.world_size + d.rank) * size for j in range(share // size)]
    return [list(range(start, start + size)) for start in first]


def check_step_memory(options: DataOptions, model_config: ModelConfig, device) -> None:
    """Refuse a micro-batch whose activations cannot fit, or a step whose micro-batches cannot (they are built
    before it runs), before any batch is built. The bound is a floor:
    each layer keeps at least its input hidden states for the backward pass (2 bytes a value in bf16), and
    the batch itself is int64 inputs and targets; the step needs more than this, never less."""
    from ..storage import available_memory

    per_token = model_config.num_hidden_layers * model_config.hidden_size * 2 + 16
    need = options.batch_size * options.seq_len * per_token
    # a step's micro-batches are all built before it runs (`Run.next_batches`): int64 inputs and targets each
    step_batches = options.grad_accum * options.batch_size * (options.seq_len + 1) * 16
    if device.type == "cuda":
        import torch

        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory() if device.type == "cpu" else None
    if free is not None and need > free:
        raise TrainError(
            f"--batch-size {options.batch_size} x --seq-len {options.seq_len} needs at least {need / 1e9:,.1f} GB of activations "
            f"per micro-batch ({per_token} bytes a token or more), but {free / 1e9:,.1f} GB of memory is available on "
            f"{device}; pass a smaller --batch-size (and a larger --grad-accum to keep the tokens per step)"
        )
    if free is not None and step_batches > free:
        raise TrainError(
            f"--grad-accum {options.grad_accum} x --batch-size {options.batch_size} x --seq-len {options.seq_len} tokens are held "
            f"at once by a step's micro-batches, {step_batches / 1e9:,.1f} GB, but {free / 1e9:,.1f} GB of memory is "
            f"available; pass a smaller --grad-accum"
        )


def check_against_data(data_options: DataOptions, eval_options: EvalOptions, objective, d: distributed.Dist) -> None:
    """Options that the objective's data must be able to honour: a micro-batch of distinct training rows, and
    held-out rows to validate on when --eval-every asks for validation."""
    token_data, rows = objective.data, objective.rows
    n_train = len(token_data.train)
    if data_options.batch_size > n_train:
        raise TrainError(
            f"--batch-size {data_options.batch_size} is more sequences than the training split holds ({n_train:,} {rows}); "
            f"pass --batch-size <= {n_train} or more data"
        )
    held_out = len(token_data.val)
    if eval_options.eval_every and held_out < d.world_size:  # not one row a process (`validation_rows`)
        raise TrainError(
            f"--eval-every {eval_options.eval_every} asks for validation, but the held-out split holds {held_out} {rows} "
            f"(--val-fraction {data_options.val_fraction:g}; a corpus under two sequences keeps none back); pass --eval-every 0, "
            "or a --val-fraction > 0 with more data"
        )


def describe_split_change(saved: dict, now: dict) -> str:
    said = [f"{now.get(k, 0):,} {k} rows, the run's {saved.get(k, 0):,}" for k in ("train", "val") if saved.get(k) != now.get(k)]
    if saved.get("val_sha256") != now.get("val_sha256"):
        said.append("other held-out tokens")
    return "; ".join(said)
