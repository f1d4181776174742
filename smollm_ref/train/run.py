"""A training run put together: `Run.build` checks every input, then makes the model, optimizer, state,
checkpointer and logger; its methods are the loop's verbs (next batches, step, record, validate, sample,
save). Nothing here decides when: that is the loop's (`smollm_ref.train.loop`)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint, data, distributed, lora, metrics, metrics_file
from ..model import LlamaForCausalLM
from ..precision import autocast_context, resolve_precision
from ..storage import DirectoryLock
from . import inputs, objectives
from .checkpointer import Checkpointer, check_compatible
from .evaluator import Evaluator
from .logger import NullLogger, RunLogger, say
from .objectives import Objective
from .objectives.base import row_digests
from .optim import check_schedule, lr_at, make_optimizer, schedule_record
from .options import LogOptions, TrainConfig, TrainError, check_overfit_batch, saved_global_batch
from .samples import Sampling, sample_seed
from .state import RunState
from .step import StepStats, fast_forward, train_step
from .step_metrics import StepMetrics


class Diverged(RuntimeError):
    """Too many non-finite steps in a row."""


def _read_inputs(cfg: TrainConfig, resume_dir: Path | None, d: distributed.Dist, device: torch.device):
    """The checkpoint's state, the model's config and weights, the tokenizer, the objective and its data, each
    checked against the others, and every option against them, before anything is built or written."""
    saved = checkpoint.load_state(resume_dir) if resume_dir is not None else None
    saved_options = {}
    if saved is not None:
        RunState.check_saved(saved, resume_dir)
        saved_options = checkpoint.load_train_config(resume_dir)
        rows = d.world_size * cfg.data.batch_size * cfg.data.grad_accum
        saved_rows = saved_global_batch(saved, saved_options, resume_dir)
        check_compatible(saved, resume_dir, d.world_size, cfg.model.fsdp, rows, saved_rows)
        check_overfit_batch(cfg.data.overfit_single_batch, cfg.data.batch_size, saved_options, saved_rows, resume_dir)
    check_schedule(cfg.optim, _horizon(cfg, saved))
    lora_spec = inputs.lora_spec(cfg.lora, cfg.model, resume_dir)
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise TrainError("--wandb needs the wandb package, which is not installed; pip install wandb, or pass --no-wandb")
    model_config, weights = inputs.model_and_weights(cfg.model, resume_dir)
    adapter = inputs.lora_adapter(lora_spec, cfg.model, resume_dir, weights)
    if cfg.data.seq_len > model_config.max_position_embeddings:
        raise TrainError(
            f"--seq-len {cfg.data.seq_len} exceeds the model's {model_config.max_position_embeddings} positions; pass --seq-len <= {model_config.max_position_embeddings}"
        )
    inputs.check_step_memory(cfg.data, model_config, device)
    tokenizer = inputs.load_tokenizer(cfg.model, resume_dir)
    model_config.check_vocab(len(tokenizer))
    objective = objectives.choose(
        cfg.data,
        tokenizer,
        max_steps=cfg.optim.max_steps,
        progress=cfg.log.progress,
        preference=cfg.preference,
        init_from=cfg.model.init_from,
    )
    # read once, before the data
    evaluator = Evaluator.build(cfg.eval, tokenizer, model_config.max_position_embeddings, objective.chat_template)
    _check_sample(cfg.log, objective, model_config)
    objective.read(d, saved, model_config.vocab_size)
    inputs.check_against_data(cfg.data, cfg.eval, objective, d)
    split = objective.split_digest()
    if saved is not None and saved.get("data_split") and saved["data_split"] != split:
        raise TrainError(
            f"the data differs from what the run of {resume_dir} trained on ({inputs.describe_split_change(saved['data_split'], split)}): "
            "resumed at its position it would read other rows and could train on held-out ones; pass the run's own "
            f"--data (and --tokenizer), or start a new run with --init-from {resume_dir}"
        )
    val_rows = inputs.kept_validation_rows(
        len(objective.data.val), cfg.eval, cfg.data.batch_size, d, saved, saved_options, resume_dir
    )
    return saved, model_config, weights, adapter, tokenizer, objective, split, evaluator, val_rows


def _horizon(cfg: TrainConfig, saved: dict | None) -> int:
    """The schedule's horizon: --lr-decay-steps, else --max-steps; an extended run keeps the one it had."""
    if saved is not None and cfg.checkpoint.additional_steps is not None and cfg.optim.lr_decay_steps is None:
        return int(saved["schedule"]["horizon"])
    return cfg.optim.lr_decay_steps or cfg.optim.max_steps


def _check_sample(options: LogOptions, objective: Objective, model_config) -> None:
    """The samples' prompt and --sample-tokens must fit the model's positions, or every checkpoint's sample fails."""
    ids = objective.sample_prompt_ids(objective.sample_prompt(options.sample_prompt))
    limit = model_config.max_position_embeddings
    if ids.shape[1] + options.sample_tokens > limit:
        what = objective.sample_prompt_name
        room = limit - ids.shape[1]
        fix = f"pass --sample-tokens <= {room}" if room > 0 else "pass a shorter --sample-prompt"
        raise TrainError(
            f"{what} is {ids.shape[1]} tokens and --sample-tokens {options.sample_tokens}: together more than the model's "
            f"{limit} positions; {fix}"
        )


@dataclass
class Run:
    cfg: TrainConfig
    d: distributed.Dist
    device: torch.device
    run_dir: Path
    model: torch.nn.Module  # what the step calls: DDP/FSDP-wrapped or compiled
    raw_model: LlamaForCausalLM  # the plain module: checkpoints, validation, samples
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    fast_loss: object  # the fast step's loss (`FastForward.lm_loss`), or None: the reference model under autocast
    autocast: object
    tokenizer: object
    objective: Objective  # what the run optimises: its data, loss, validation and samples
    order: data.Order  # the row order over the training data, fixed by --seed
    eval_batches: list[list[int]]  # this rank's validation batches (none without --eval-every)
    val_rows: int  # the held-out rows a validation reads, all ranks: kept by a resume (`inputs.kept_validation_rows`)
    state: RunState
    max_steps: int
    checkpointer: Checkpointer
    logger: NullLogger
    step_metrics: StepMetrics
    resumed_from: Path | None = None
    resumed_world_size: int | None = None  # the processes that wrote the checkpoint resumed from
    created_dir: bool = False  # this run made its directory (an interruption before the first step removes it)
    lock: DirectoryLock | None = None  # the run directory's lock, held by the main rank
    why_not_fast: str | None = None  # why the step is the reference's (`step.fast_step_unsupported`), for the log
    prepared: str | None = None  # what the objective took from the initial model (`Objective.prepare`), for the log
    evaluator: Evaluator | None = None  # --eval-tasks: benchmark figures at each validation
    adapter: lora.Adapter | None = None  # --lora-rank: the LoRA adapter trained on the frozen base
    bad_steps: int = 0
    last_loss: float | None = None
    last_val: float | None = None

    @property
    def per_step(self) -> int:
        """Rows of the data (windows, conversations rows, pairs) per optimizer step, all ranks."""
        return self.d.world_size * self.cfg.data.batch_size * self.cfg.data.grad_accum

    @property
    def data(self):
        """The objective's data: `train` and `val` rows."""
        return self.objective.data

    @classmethod
    def build(cls, cfg: TrainConfig, resume_dir: Path | None, d: distributed.Dist, device: torch.device) -> Run:
        """Check every input, then put the run together. Whatever fails or is interrupted on the way leaves
        the run directory as it found it (a directory this call created is removed) and the lock released."""
        inputs.check_same_options(cfg.to_dict(), resume_dir, d)  # before any rank reads or writes anything
        try:
            precision = resolve_precision(cfg.model.precision, device)
        except ValueError as e:
            raise TrainError(str(e)) from None
        run_dir = Path(cfg.checkpoint.out_dir).expanduser()
        created, lock = inputs.check_out_dir(cfg.checkpoint, resume_dir is not None or cfg.checkpoint.resume == "auto", d)
        try:
            if cfg.model.fsdp:
                inputs.check_shared_run_dir(run_dir, d, device)
            saved, model_config, weights, adapter, tokenizer, objective, split, evaluator, val_rows = _read_inputs(
                cfg, resume_dir, d, device
            )
            if d.is_main:
                for path in inputs.sweep_temporaries(run_dir):
                    say(f"removed {path}, left by a run that was killed while writing a checkpoint")
                if cfg.checkpoint.overwrite and cfg.checkpoint.resume is None:
                    inputs.clear_run_dir(run_dir)  # only now that every input has been checked
            distributed.barrier(d)
            run = cls._assemble(
                cfg, d, device, precision, run_dir, saved, resume_dir, model_config, weights, adapter, tokenizer, objective, split,
                val_rows,
            )  # fmt: skip
        except BaseException:
            if lock is not None:
                lock.release()
            if created and d.is_main:
                shutil.rmtree(run_dir, ignore_errors=True)  # leave nothing behind for a run that never started
            raise
        run.resumed_from, run.created_dir, run.lock, run.evaluator = resume_dir, created, lock, evaluator
        run.resumed_world_size = int(saved.get("world_size", 1)) if saved is not None else None
        run._describe(precision, model_config)
        return run

    @classmethod
    def _assemble(
        cls, cfg, d, device, precision, run_dir, saved, resume_dir, model_config, weights, adapter, tokenizer, objective, split,
        val_rows,
    ) -> Run:  # fmt: skip
        torch.manual_seed(cfg.data.seed)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls; on CPU fp32 stays exact fp32
        raw_model = LlamaForCausalLM(model_config)
        if weights is not None:
            from ..weights import load_into

            load_into(raw_model, weights)
        del weights
        if adapter is not None:  # the base frozen, peft's adapters on it (a resumed run's with their weights)
            lora.attach(raw_model, adapter.spec, adapter.state)
        raw_model.to(device).train()
        model = distributed.wrap(raw_model, d, cfg.model.fsdp, device)
        optimizer = make_optimizer(raw_model, cfg.optim, sharded=cfg.model.fsdp)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
        checkpointer = Checkpointer(
            run_dir, cfg.checkpoint, d, raw_model, optimizer, scaler, tokenizer,
            fsdp=cfg.model.fsdp, schedule=schedule_record(cfg.optim), run_options=cfg.to_dict(),
            objective_state=objective.checkpoint_state, rows=d.world_size * cfg.data.batch_size * cfg.data.grad_accum,
            val_rows=val_rows, adapter=adapter,
        )  # fmt: skip
        horizon = _horizon(cfg, saved)  # an extended run keeps the horizon it had
        state = checkpointer.restore(saved, horizon, resume_dir) if saved is not None else RunState(horizon=horizon)
        additional = cfg.checkpoint.additional_steps
        max_steps = state.step + additional if additional is not None else cfg.optim.max_steps
        if state.step >= max_steps:
            raise TrainError(
                f"the checkpoint is at step {state.step}, already at --max-steps {max_steps}; pass --additional-steps N or a larger --max-steps"
            )
        fast, why_not_fast = fast_forward(raw_model, cfg.model, d.world_size, precision, objective.fast_step_unsupported)
        if cfg.model.compile and fast is None:
            model = torch.compile(model)
        logger = RunLogger(run_dir, cfg.log, state.step, state.wandb_run_id, cfg.to_dict()) if d.is_main else NullLogger()
        state.wandb_run_id = logger.wandb_run_id
        autocast = autocast_context(device, precision)
        prepared = objective.prepare(raw_model, device, autocast, d)  # the initial model, before any step
        token_data = objective.data
        if saved is not None and not saved.get("data_split") and saved.get("data_key") != token_data.key:
            logger.say(  # a checkpoint from before split digests: the store's key is all there is to compare
                f"warning: the data's store differs from the checkpoint's (key {saved.get('data_key')} vs {token_data.key}: "
                "other files, or the same ones moved or touched); the position is kept, so check that the tokens are the same"
            )
        state.data_key, state.data_budget, state.data_split = token_data.key, objective.budget, split
        if d.is_main:
            (run_dir / checkpoint.TRAIN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        seq_len = cfg.data.seq_len
        # the tokens a step trains on, all ranks: its rows' sequences (a pair is two) x --seq-len
        sequences = d.world_size * cfg.data.batch_size * cfg.data.grad_accum * objective.sequences_per_row
        peak = metrics.peak_flops(metrics.device_name(device), precision) if device.type == "cuda" else None
        step_metrics = StepMetrics(sequences * seq_len, metrics.flops_per_token(model_config, seq_len), peak, d.world_size)
        return cls(
            cfg=cfg, d=d, device=device, run_dir=run_dir, model=model, raw_model=raw_model, optimizer=optimizer, scaler=scaler,
            fast_loss=fast.lm_loss if fast is not None else None, autocast=autocast, tokenizer=tokenizer,
            objective=objective, order=data.Order(len(token_data.train), cfg.data.seed),
            eval_batches=inputs.eval_batches(val_rows, cfg.data.batch_size, d) if cfg.eval.eval_every else [], val_rows=val_rows,
            state=state, max_steps=max_steps, checkpointer=checkpointer, logger=logger, step_metrics=step_metrics, why_not_fast=why_not_fast,
            prepared=prepared, adapter=adapter,
        )  # fmt: skip

    def _describe(self, precision: str, model_config) -> None:
        cfg, d = self.cfg, self.d
        peak = self.step_metrics.peak
        peak = f"{peak / 1e12:g} TFLOP/s per device" if peak else "unknown for this device: no MFU"
        for line in (self.objective.announce(), self.prepared, self._lora_line()):
            if line:
                self.logger.say(line)
        data_line = self.objective.describe()
        if cfg.eval.eval_every:
            batches = self.eval_batches
            data_line += (
                f" (validation on {len(batches)} batches of --eval-batches {cfg.eval.eval_batches}: the first {self.val_rows:,} "
                f"held-out rows, {len(batches[0])} a batch)"
            )
        step_kind = "fast step" if self.fast_loss is not None else f"reference step ({self.why_not_fast})"
        self.logger.say(
            f"model {model_config.num_parameters():,} parameters | device {metrics.device_name(self.device)} x{d.world_size} | {precision}, "
            f"{step_kind} | {self.step_metrics.tokens_per_step // cfg.data.seq_len} x {cfg.data.seq_len} tokens per step | {data_line} | MFU peak {peak} | run dir {self.run_dir}"
        )
        warning = self.checkpointer.space_warning() if d.is_main else None
        if warning:
            self.logger.say(warning)
        if self.evaluator is not None:
            self.logger.say(self.evaluator.describe())
        if self.resumed_from is not None:
            layout = ""
            if self.resumed_world_size != d.world_size:
                layout = (
                    f"; written by {self.resumed_world_size} process(es), continued on {d.world_size} with --batch-size "
                    f"{cfg.data.batch_size} x --grad-accum {cfg.data.grad_accum}: the same {self.per_step} rows a step"
                )
                if cfg.eval.eval_every:
                    layout += f", validation on the same first {self.val_rows:,} held-out rows"
            self.logger.say(
                f"resumed from {self.resumed_from} at step {self.state.step} ({self.state.tokens:,} tokens seen){layout}"
            )

    def _lora_line(self) -> str | None:
        if self.adapter is None:
            return None
        trainable = sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.raw_model.parameters())
        return (
            f"LoRA through peft: {self.adapter.spec.describe()}; {trainable:,} trainable parameters "
            f"({100 * trainable / total:.2f}% of {total:,}), the base ({self.adapter.base.source}) frozen"
        )

    def step_rows(self) -> list[int]:
        """The training rows the next step reads, all ranks, in their global order: the next `per_step` of the row
        order (a function of --seed and the run's position alone), or with --overfit-single-batch the first
        --batch-size rows for every micro-batch (a resume keeps the run's --batch-size: `check_overfit_batch`).
        Micro-batch m of rank r is slice m x ranks + r of --batch-size rows, so a step reads the same rows on any
        number of processes that keeps the global batch."""
        options = self.cfg.data
        if options.overfit_single_batch:
            return self.order.indices(0, options.batch_size) * (self.per_step // options.batch_size)
        return self.order.indices(self.state.data_position, self.per_step)

    def next_batches(self, rows: list[int]) -> list[tuple[torch.Tensor, ...]]:
        """This rank's micro-batches of the step that reads `rows` (`step_rows`): (inputs, targets) windows of
        text, (input_ids, labels, position_ids or None) rows of chat, (input_ids, labels, reference) pairs."""
        size, micro = self.cfg.data.batch_size, []
        for m in range(self.cfg.data.grad_accum):
            k = m * self.d.world_size + self.d.rank  # this rank's micro-batch m of the step
            batch = self.data.train.batch(rows[k * size : (k + 1) * size])
            micro.append(tuple(t.to(self.device, non_blocking=True) if t is not None else None for t in batch))
        return micro

    def batch_digest(self, rows: list[int]) -> str | None:
        """--batch-digest: the first 16 hex digits of a SHA-256 over the SHA-256 of each row the step trains on
        (`row_digests`), in the step's global order (`step_rows`), on the main rank (None elsewhere). Each rank
        hashes the rows it reads itself, from its own data, and rank 0 gathers them (a collective): a rank that
        reads other rows or other tokens (another node's copy of --data) changes the digest, which stays the same
        on any number of processes that read the same rows."""
        size, ranks, accum = self.cfg.data.batch_size, self.d.world_size, self.cfg.data.grad_accum
        mine = [rows[(m * ranks + self.d.rank) * size + i] for m in range(accum) for i in range(size)]
        hashes = torch.frombuffer(bytearray(row_digests(self.data.train, mine)), dtype=torch.uint8)
        everyone = [t.cpu().numpy().tobytes() for t in distributed.all_tensors(self.d, hashes.to(self.device))]
        if not self.d.is_main:
            return None
        each = size * 32  # one micro-batch's rows' digests
        ordered = (everyone[r][m * each : (m + 1) * each] for m in range(accum) for r in range(ranks))  # micro m, rank r
        return hashlib.sha256(b"".join(ordered)).hexdigest()[:16]

    def step(self) -> dict:
        """One optimizer step; the run state advances and the step's metrics come back."""
        self.step_metrics.start()
        lr = lr_at(self.state.step, self.cfg.optim, self.state.horizon)
        rows = self.step_rows()
        micro = self.next_batches(rows)
        digest = self.batch_digest(rows) if self.cfg.log.batch_digest else None
        step_loss = self.objective.step_loss(self.model, self.fast_loss, micro, self.d)
        stats: StepStats = train_step(
            self.model,
            micro,
            self.optimizer,
            self.scaler,
            lr=lr,
            grad_clip=self.cfg.optim.grad_clip,
            autocast=None if self.fast_loss is not None else self.autocast,  # the fast step does its own mixed precision
            loss_fn=step_loss.loss_fn,
            divide_by=step_loss.divide_by,
        )
        loss = float(distributed.mean(self.d, stats.loss))
        self.state.advance(self.per_step, self.step_metrics.tokens_per_step)
        values = {
            "loss": loss,
            "lr": lr,
            "grad_norm": stats.grad_norm,
            **self.step_metrics.measure(self.state.tokens, self.order.epoch(self.state.data_position)),
            **step_loss.metrics,
            **(step_loss.summary() if step_loss.summary is not None else {}),
        }
        if digest is not None:
            values["batch_sha256"] = digest
        if stats.skipped:
            values["skipped"] = True
        return values

    def record(self, values: dict) -> None:
        """Log a step; count non-finite ones and stop the run (Diverged) after --max-bad-steps in a row."""
        step = self.state.step
        if values.get("skipped"):
            self.bad_steps += 1
            self.logger.say(
                f"step {step}: non-finite gradient (norm {values['grad_norm']}, loss {values['loss']}); update skipped ({self.bad_steps} in a row)"
            )
        else:
            self.bad_steps, self.last_loss = 0, values["loss"]
        self.logger.step(step, values, self.objective.shown_metrics)
        if self.bad_steps >= self.cfg.optim.max_bad_steps and self.scaler is None:
            raise Diverged(
                f"training diverged: {self.bad_steps} non-finite steps in a row up to step {step}; lower --lr, raise --warmup-steps, "
                f"or use --precision fp32, then --resume from the last good checkpoint"
            )

    def validate(self) -> None:
        if not self.eval_batches:
            return
        self.last_val, figures = self.objective.validate(self.raw_model, self.eval_batches, self.device, self.autocast, self.d)
        if self.evaluator is not None:
            figures = {**figures, **self.evaluator(self.raw_model, self.autocast)}
        self.logger.validation(self.state.step, self.last_val, figures, tuple(f"val_{k}" for k in self.objective.shown_metrics))

    def sample(self) -> None:
        """A sample of the model at this step, drawn as --sample-temperature and --sample-top-k say, from its own
        generator seeded by --seed and the step (a resumed run draws what the straight one drew)."""
        options, step = self.cfg.log, self.state.step
        sampling = Sampling(options.sample_temperature, options.sample_top_k or None, sample_seed(self.cfg.data.seed, step))
        prompt = self.objective.sample_prompt(options.sample_prompt)
        text = self.objective.sample(self.raw_model, prompt, options.sample_tokens, self.device, self.autocast, sampling)
        self.logger.sample(step, text, sampling)

    def save(self) -> Path | None:
        path = self.checkpointer.save(self.state)
        if path is not None:
            self.logger.say(self.checkpointer.describe(path))
        return path

    def close(self) -> None:
        """Teardown: the logger (bar, metrics file, WandB), then the run directory's lock."""
        self.logger.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def discard(self) -> str:
        """Remove what this run wrote before its first step (it was interrupted; nothing is worth resuming) and
        say what is left."""
        self.logger.close()
        if not self.d.is_main:
            return ""
        if self.created_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return f"removed {self.run_dir}, which this run had created; run the same command again to start over"
        for name in (metrics_file.NAME, checkpoint.TRAIN_CONFIG):
            (self.run_dir / name).unlink(missing_ok=True)
        return f"removed the metrics.jsonl and {checkpoint.TRAIN_CONFIG} this run had written in {self.run_dir}; run the same command again to start over"
