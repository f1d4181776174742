"""The trainer's checkpointer: when to save, what a checkpoint holds, restoring a run from one, which
checkpoints to keep. The files and their atomic writing are `smollm_ref.checkpoint`'s."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .. import checkpoint, distributed, storage
from ..model import LlamaForCausalLM
from . import sharded
from .logger import say
from .options import CheckpointOptions, SharedRefusal, TrainError
from .state import RunState


class CheckpointSpace(TrainError):
    """A checkpoint could not be written for lack of space; the message says where and what to do."""


def check_compatible(saved: dict, resume_dir: Path, world_size: int, fsdp: bool, rows: int, saved_rows: int) -> None:
    """A checkpoint resumes on any number of processes that keeps its global batch: `rows` a step (processes x
    --batch-size x --grad-accum) must be the run's `saved_rows` (`options.saved_global_batch`); and the same way,
    with or without --fsdp, with its optimizer state."""
    if rows != saved_rows:
        raise TrainError(
            f"checkpoint {resume_dir} trains {saved_rows} rows a step, this run {rows} ({world_size} process(es) x --batch-size "
            "x --grad-accum); resume it through --resume, which keeps the global batch, or with sizes whose product is "
            f"{saved_rows}"
        )
    if bool(saved.get("fsdp", False)) != fsdp:
        raise SharedRefusal(
            f"checkpoint {resume_dir} was written {'with' if saved.get('fsdp') else 'without'} --fsdp; resume it the same way, "
            f"or start a new run from its weights with --init-from {resume_dir} (the optimizer state starts afresh)"
        )
    if "optimizer" not in saved and "optimizer_sharded" not in saved:
        raise TrainError(
            f"checkpoint {resume_dir} holds no optimizer state (--optimizer-state latest keeps it only in the newest "
            f"checkpoint); resume from the newest one, or start a new run from these weights with --init-from {resume_dir}"
        )


class Checkpointer:
    """Owns the decision to save and the contents of a checkpoint. Every rank calls `save`: under FSDP the
    model's full state is gathered collectively and every rank writes its shard of the optimizer state
    (`sharded`, into `optimizer/`); rank 0 alone writes the rest. DDP's optimizer state is one file, the same on
    every rank."""

    def __init__(
        self,
        run_dir: Path,
        options: CheckpointOptions,
        d: distributed.Dist,
        model,
        optimizer,
        scaler,
        tokenizer,
        *,
        fsdp: bool,
        schedule: dict,
        run_options: dict,
        objective_state=dict,
        rows: int,
        val_rows: int,
        adapter=None,
    ):
        """`options`: the run's `cfg.checkpoint`. Besides the model, a checkpoint holds `schedule` (the
        learning-rate schedule, `optim.schedule_record`), what `objective_state()` returns (the objective's
        `checkpoint_state`), `rows`, the global batch (rows a step, all ranks), and `val_rows`, the held-out rows a
        validation reads (all ranks), in its run state, and
        `run_options` (every option, flat: `TrainConfig.to_dict()`) as its train_config.json; `fsdp`: the model is
        sharded (--fsdp), its state gathered and its optimizer state written in shards; `adapter` (`lora.Adapter`):
        a LoRA run's, saved in peft's format with its base's record in place of the model's weights."""
        self.root = checkpoint.checkpoints_root(run_dir)
        self.options, self.d, self.rows, self.val_rows = options, d, rows, val_rows
        self.fsdp, self.schedule, self.run_options, self.objective_state = fsdp, schedule, run_options, objective_state
        self.model, self.optimizer, self.scaler, self.tokenizer = model, optimizer, scaler, tokenizer
        self.adapter = adapter
        self.last: Path | None = None

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.options.checkpoint_every == 0 or step == max_steps

    def restore(self, saved: dict, horizon: int, resume_dir: Path) -> RunState:
        """Load the optimizer, scaler and RNG states of `saved` (the `trainer_state.pt` of `resume_dir`) and return
        its run state, with the schedule's `horizon` (the run's: an extended run keeps the one it had). The
        optimizer state is resharded to this run's ranks: DCP's shards (`sharded`), or one file (DDP, one process,
        or an FSDP run from before sharded checkpoints)."""
        if "optimizer_sharded" in saved:
            where = resume_dir / saved["optimizer_sharded"]["dir"]
            sharded.load_optimizer(self.model, self.optimizer, where, saved["optimizer_sharded"]["param_groups"])
        else:
            distributed.load_optimizer_state(self.optimizer, saved["optimizer"], self.fsdp)
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        checkpoint.set_rng_state(saved["rng"])
        return RunState.from_checkpoint(saved, horizon)

    def save(self, state: RunState) -> Path | None:
        """Write a checkpoint of `state` (on rank 0; other ranks return None) and apply --keep-last and
        --optimizer-state."""
        trainer_state = {
            **self.objective_state(),
            **state.to_checkpoint(self.schedule, self.d.world_size, self.fsdp, self.rows, self.val_rows),
        }
        trainer_state["scaler"] = self.scaler.state_dict() if self.scaler is not None else {}
        model_state = distributed.full_model_state(self.model) if self.fsdp else None
        staged = None
        if self.fsdp:
            staged = self.root / f".tmp-{checkpoint.step_dir_name(state.step)}-{sharded.DIR}"
            param_groups = self._save_sharded(staged, state.step)
            if param_groups is None:  # no space, and --on-disk-full continue: every rank goes on
                return None
            trainer_state["optimizer_sharded"] = {"dir": sharded.DIR, "param_groups": param_groups}
        else:
            trainer_state["optimizer"] = self.optimizer.state_dict()
        path = None
        if self.d.is_main:

            def write_files(tmp: Path) -> None:
                from ..weights import load_into, save_pretrained

                if staged is not None:  # every rank's shard is there: check, then take the folder in
                    sharded.read_metadata(staged, fix="put --out-dir on a file system every node shares")
                    staged.rename(tmp / sharded.DIR)
                cpu_model = self.model
                if self.fsdp:  # sharded: rebuild the whole model on CPU from the gathered state
                    cpu_model = LlamaForCausalLM(self.model.config)
                    load_into(cpu_model, model_state)
                if self.adapter is not None:
                    from .. import lora

                    lora.save(cpu_model, self.adapter.spec, self.adapter.base, tmp)
                    self.tokenizer.save_pretrained(tmp)
                else:
                    save_pretrained(cpu_model, tmp, self.tokenizer)
                torch.save(trainer_state, tmp / checkpoint.STATE)
                (tmp / checkpoint.TRAIN_CONFIG).write_text(json.dumps(self.run_options, indent=2) + "\n")

            path = self._write(state.step, write_files)
        distributed.barrier(self.d)
        return path

    def _save_sharded(self, staged: Path, step: int) -> list[dict] | None:
        """Every rank writes its shard of the optimizer state into `staged` (a collective); the param groups, or
        None when the disk is full and --on-disk-full continue says to go on (every rank sees the same failure:
        DCP hands it to all)."""
        from torch.distributed.checkpoint import CheckpointException

        if self.d.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staged, ignore_errors=True)  # a killed run's, of the same step
        distributed.barrier(self.d)
        try:
            return sharded.save_optimizer(self.model, self.optimizer, staged)
        except CheckpointException as e:  # a BaseException: the loop's handlers would not see it
            failure = e
        if self.d.is_main:
            shutil.rmtree(staged, ignore_errors=True)
        what = f"checkpoint {checkpoint.step_dir_name(step)}"
        if not storage.is_disk_full(failure):
            raise RuntimeError(f"writing the sharded optimizer state of {what} failed: {failure}") from None
        error = storage.disk_full_error(self.root, what, self.bytes_needed())
        kept = f"the previous checkpoint {self.last} is kept" if self.last else "no checkpoint of this run was written"
        if self.options.on_disk_full == "continue":
            if self.d.is_main:
                say(f"warning: {error}; {kept}; training goes on and tries again at the next checkpoint")
            return None
        raise CheckpointSpace(f"{error}; {kept}; free some space, then continue with --resume {self.root.parent}") from None

    def _write(self, step: int, write_files) -> Path | None:
        options = self.options
        try:
            path = checkpoint.write(self.root, step, write_files, options.keep_last or None)
        except (OSError, RuntimeError) as e:  # torch.save wraps ENOSPC in a RuntimeError without its errno
            if not storage.is_disk_full(e, self.root, self.bytes_needed()):
                raise
            error = storage.disk_full_error(self.root, f"checkpoint {checkpoint.step_dir_name(step)}", self.bytes_needed())
            kept = f"the previous checkpoint {self.last} is kept" if self.last else "no checkpoint of this run was written"
            if options.on_disk_full == "continue":
                say(f"warning: {error}; {kept}; training goes on and tries again at the next checkpoint")
                return None
            raise CheckpointSpace(f"{error}; {kept}; free some space, then continue with --resume {self.root.parent}") from None
        if options.optimizer_state == "latest":
            for _, older in checkpoint.list_checkpoints(self.root)[:-1]:
                drop_optimizer_state(older)
        self.last = path
        return path

    def bytes_needed(self) -> int:
        """About what one checkpoint takes: float32 weights (LoRA: the adapter's), and twice that again for AdamW's
        two moments."""
        weights = sum(p.numel() * 4 for p in self.model.parameters() if p.requires_grad or self.adapter is None)
        return weights * 3 + 20_000_000  # + tokenizer files and run state

    def space_warning(self) -> str | None:
        """A warning when the run directory's disk holds less than two checkpoints."""
        free, needed = storage.free_bytes(self.root.parent), self.bytes_needed()
        if free >= 2 * needed:
            return None
        return (
            f"warning: {storage.size(free)} free on the device holding {self.root.parent}, less than two checkpoints "
            f"(about {storage.size(needed)} each); free some space or lower --keep-last"
        )

    def describe(self, path: Path) -> str:
        files = checkpoint.payload_files(path)
        total = sum(p.stat().st_size for p in files)
        optimizer = sum(p.stat().st_size for p in files if p.name == checkpoint.STATE or p.parent.name == sharded.DIR)
        return f"checkpoint {path} ({storage.size(total)}, of which {storage.size(optimizer)} optimizer and run state)"


def drop_optimizer_state(directory: Path) -> None:
    """Rewrite an older checkpoint's trainer_state.pt without its AdamW state (weights, run state and RNG
    stay, so it still loads as a model and says why it cannot resume), and remove its sharded optimizer folder.
    The manifest is rewritten to match; both replace their files by rename, before the folder goes. A checkpoint
    already slimmed is left alone."""
    state_path = directory / checkpoint.STATE
    try:
        manifest = checkpoint.read_manifest(directory)
        if not isinstance(manifest.get("files"), dict):
            raise checkpoint.CheckpointError(f"checkpoint {directory}: {checkpoint.MANIFEST} has no 'files' mapping")
    except checkpoint.CheckpointError as e:  # an unusable older checkpoint: training goes on, its state stays
        say(f"warning: {e}; its optimizer state is left in place")
        return
    saved = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
    if "optimizer" not in saved and "optimizer_sharded" not in saved:
        return
    saved = {k: v for k, v in saved.items() if k not in ("optimizer", "optimizer_sharded", "scaler")}
    tmp_state = directory / f".{checkpoint.STATE}.tmp{os.getpid()}"
    torch.save(saved, tmp_state)
    manifest["files"][checkpoint.STATE] = checkpoint.file_entry(tmp_state)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(f"{sharded.DIR}/")}
    tmp_manifest = directory / f".{checkpoint.MANIFEST}.tmp{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp_state.replace(state_path)
    tmp_manifest.replace(directory / checkpoint.MANIFEST)
    shutil.rmtree(directory / sharded.DIR, ignore_errors=True)  # no longer in the manifest: a crash here leaves spare files
