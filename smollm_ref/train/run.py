"""A training run put together: `Run.build` checks every input, then makes the model, optimizer, state,
checkpointer and logger; its methods are the loop's verbs (next batches, step, record, validate, sample,
save). Nothing here decides when: that is the loop's (`smollm_ref.train.loop`)."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint, data, distributed, metrics
from ..data.conversations import ChatData
from ..model import LlamaForCausalLM
from ..storage import DirectoryLock
from . import inputs
from .checkpointer import Checkpointer, check_compatible
from .evaluator import Evaluator
from .logger import NullLogger, RunLogger, say
from .options import TrainConfig, TrainError
from .state import RunState
from .step import (
    Sampling,
    StepStats,
    autocast_context,
    chat_prompt_ids,
    check_schedule,
    evaluate,
    evaluate_chat,
    fast_forward,
    lr_at,
    make_optimizer,
    resolve_precision,
    sample_chat,
    sample_prompt_text,
    sample_seed,
    sample_text,
    sft_loss_sum,
    text_prompt_ids,
    train_step,
    trained_tokens,
)

CHAT_SAMPLE_QUESTION = "What does the Python module `json` do?"  # when --sample-prompt is left at its text default


class Diverged(RuntimeError):
    """Too many non-finite steps in a row."""


def _read_inputs(cfg: TrainConfig, resume_dir: Path | None, d: distributed.Dist, device: torch.device):
    """The checkpoint's state, the model's config and weights, the tokenizer and the token windows, each
    checked against the others, and every option against them, before anything is built or written."""
    saved = checkpoint.load_state(resume_dir) if resume_dir is not None else None
    if saved is not None:
        RunState.check_saved(saved, resume_dir)
        check_compatible(saved, resume_dir, d.world_size, cfg.fsdp)
    check_schedule(cfg, _horizon(cfg, saved))
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise TrainError("--wandb needs the wandb package, which is not installed; pip install wandb, or pass --no-wandb")
    model_config, weights = inputs.model_and_weights(cfg, resume_dir)
    if cfg.seq_len > model_config.max_position_embeddings:
        raise TrainError(
            f"--seq-len {cfg.seq_len} exceeds the model's {model_config.max_position_embeddings} positions; pass --seq-len <= {model_config.max_position_embeddings}"
        )
    inputs.check_step_memory(cfg, model_config, device)
    tokenizer = inputs.load_tokenizer(cfg, resume_dir)
    model_config.check_vocab(len(tokenizer))
    chat = inputs.is_chat(cfg)
    evaluator = Evaluator.build(cfg, tokenizer, model_config.max_position_embeddings, chat)  # read once, before the data
    _check_sample(cfg, tokenizer, model_config, chat)
    budget = inputs.data_budget(cfg, d.world_size, saved)
    token_data = (
        inputs.chat_data(cfg, tokenizer) if chat else inputs.token_data(cfg, tokenizer, d, budget, model_config.vocab_size)
    )
    inputs.check_against_data(cfg, token_data, d)
    split = inputs.split_digest(token_data)
    if saved is not None and saved.get("data_split") and saved["data_split"] != split:
        raise TrainError(
            f"the data differs from what the run of {resume_dir} trained on ({inputs.describe_split_change(saved['data_split'], split)}): "
            "resumed at its position it would read other rows and could train on held-out ones; pass the run's own "
            f"--data (and --tokenizer), or start a new run with --init-from {resume_dir}"
        )
    return saved, model_config, weights, tokenizer, token_data, split, evaluator


def _horizon(cfg: TrainConfig, saved: dict | None) -> int:
    """The schedule's horizon: --lr-decay-steps, else --max-steps; an extended run keeps the one it had."""
    if saved is not None and cfg.additional_steps is not None and cfg.lr_decay_steps is None:
        return int(saved["schedule"]["horizon"])
    return cfg.lr_decay_steps or cfg.max_steps


def _sample_prompt(cfg: TrainConfig, chat: bool) -> str:
    """What the samples continue: --sample-prompt without trailing spaces; for chat data the question
    asked (a built-in one when --sample-prompt is left at its text default)."""
    prompt = sample_prompt_text(cfg.sample_prompt)
    if chat and prompt == TrainConfig.sample_prompt:
        return CHAT_SAMPLE_QUESTION
    return prompt


def _check_sample(cfg: TrainConfig, tokenizer, model_config, chat: bool) -> None:
    """The samples' prompt and --sample-tokens must fit the model's positions, or every checkpoint's sample fails."""
    prompt = _sample_prompt(cfg, chat)
    ids = chat_prompt_ids(tokenizer, prompt) if chat else text_prompt_ids(tokenizer, prompt, 0)
    limit = model_config.max_position_embeddings
    if ids.shape[1] + cfg.sample_tokens > limit:
        what = "the chat sample's prompt (the question in the chat template)" if chat else "--sample-prompt"
        room = limit - ids.shape[1]
        fix = f"pass --sample-tokens <= {room}" if room > 0 else "pass a shorter --sample-prompt"
        raise TrainError(
            f"{what} is {ids.shape[1]} tokens and --sample-tokens {cfg.sample_tokens}: together more than the model's "
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
    loss_fn: object  # the fast step's loss, or None for the reference model under autocast
    autocast: object
    tokenizer: object
    data: inputs.TokenData
    order: data.Order  # the window order over the training tokens, fixed by --seed
    eval_batches: list[list[int]]  # this rank's validation batches
    state: RunState
    max_steps: int
    checkpointer: Checkpointer
    logger: NullLogger
    resumed_from: Path | None = None
    created_dir: bool = False  # this run made its directory (an interruption before the first step removes it)
    lock: DirectoryLock | None = None  # the run directory's lock, held by the main rank
    why_not_fast: str | None = None  # why the step is the reference's (`step.fast_step_unsupported`), for the log
    chat: bool = False  # chat data: loss on assistant replies only, rows of (input_ids, labels, position_ids)
    evaluator: Evaluator | None = None  # --eval-tasks: benchmark figures at each validation
    bad_steps: int = 0
    last_loss: float | None = None
    last_val: float | None = None
    per_step: int = 0  # sequences per optimizer step, all ranks
    flops_per_token: int = 0
    peak: float | None = None  # the device's dense peak FLOP/s, where known (MFU)
    throughput: metrics.Throughput | None = None

    # ---- set-up ------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, cfg: TrainConfig, resume_dir: Path | None, d: distributed.Dist, device: torch.device) -> Run:
        """Check every input, then put the run together. Whatever fails or is interrupted on the way leaves
        the run directory as it found it (a directory this call created is removed) and the lock released."""
        precision = resolve_precision(cfg.precision, device)
        run_dir = Path(cfg.out_dir).expanduser()
        created, lock = inputs.check_out_dir(cfg, resume_dir is not None or cfg.resume == "auto", d)
        try:
            saved, model_config, weights, tokenizer, token_data, split, evaluator = _read_inputs(cfg, resume_dir, d, device)
            if d.is_main:
                for path in inputs.sweep_temporaries(run_dir):
                    say(f"removed {path}, left by a run that was killed while writing a checkpoint")
                if cfg.overwrite and cfg.resume is None:
                    inputs.clear_run_dir(run_dir)  # only now that every input has been checked
            distributed.barrier(d)
            run = cls._assemble(cfg, d, device, precision, run_dir, saved, model_config, weights, tokenizer, token_data, split)
        except BaseException:
            if lock is not None:
                lock.release()
            if created and d.is_main:
                shutil.rmtree(run_dir, ignore_errors=True)  # leave nothing behind for a run that never started
            raise
        run.resumed_from, run.created_dir, run.lock, run.evaluator = resume_dir, created, lock, evaluator
        run._describe(precision, model_config)
        return run

    @classmethod
    def _assemble(cls, cfg, d, device, precision, run_dir, saved, model_config, weights, tokenizer, token_data, split) -> Run:
        torch.manual_seed(cfg.seed)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls; on CPU fp32 stays exact fp32
        raw_model = LlamaForCausalLM(model_config)
        if weights is not None:
            from ..weights import load_into

            load_into(raw_model, weights)
        del weights
        raw_model.to(device).train()
        model = distributed.wrap(raw_model, d, cfg.fsdp, device)
        optimizer = make_optimizer(raw_model, cfg)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
        checkpointer = Checkpointer(run_dir, cfg, d, raw_model, optimizer, scaler, tokenizer)
        horizon = cfg.lr_decay_steps or cfg.max_steps
        state = checkpointer.restore(saved, horizon) if saved is not None else RunState(horizon=horizon)
        max_steps = state.step + cfg.additional_steps if cfg.additional_steps is not None else cfg.max_steps
        if state.step >= max_steps:
            raise TrainError(
                f"the checkpoint is at step {state.step}, already at --max-steps {max_steps}; pass --additional-steps N or a larger --max-steps"
            )
        chat = isinstance(token_data, ChatData)
        fast, why_not_fast = fast_forward(raw_model, cfg, d.world_size, precision, chat)
        if cfg.compile and fast is None:
            model = torch.compile(model)
        logger = RunLogger(run_dir, cfg, state.step, state.wandb_run_id) if d.is_main else NullLogger()
        state.wandb_run_id = logger.wandb_run_id
        if saved is not None and not saved.get("data_split") and saved.get("data_key") != token_data.key:
            logger.say(  # a checkpoint from before split digests: the store's key is all there is to compare
                f"warning: the data's store differs from the checkpoint's (key {saved.get('data_key')} vs {token_data.key}: "
                "other files, or the same ones moved or touched); the position is kept, so check that the tokens are the same"
            )
        state.data_key, state.data_budget, state.data_split = token_data.key, getattr(token_data, "budget", None), split
        if d.is_main:
            (run_dir / checkpoint.TRAIN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        return cls(
            cfg=cfg, d=d, device=device, run_dir=run_dir, model=model, raw_model=raw_model, optimizer=optimizer, scaler=scaler,
            loss_fn=fast.lm_loss if fast is not None else None, autocast=autocast_context(device, precision), tokenizer=tokenizer,
            data=token_data, order=data.Order(len(token_data.train), cfg.seed), eval_batches=inputs.eval_batches(len(token_data.val), cfg, d),
            state=state, max_steps=max_steps, checkpointer=checkpointer, logger=logger, chat=chat, why_not_fast=why_not_fast,
        )  # fmt: skip

    def _describe(self, precision: str, model_config) -> None:
        cfg, d = self.cfg, self.d
        self.per_step = d.world_size * cfg.batch_size * cfg.grad_accum
        self.flops_per_token = metrics.flops_per_token(model_config, cfg.seq_len)
        self.peak = metrics.peak_flops(metrics.device_name(self.device), precision) if self.device.type == "cuda" else None
        self.throughput = metrics.Throughput()
        peak = f"{self.peak / 1e12:g} TFLOP/s per device" if self.peak else "unknown for this device: no MFU"
        if self.chat:
            self.logger.say(self.data.describe())
            data_line = f"train {len(self.data.train):,} rows, val {len(self.data.val):,}"
        else:
            data_line = (
                f"train {self.data.train_tokens:,} tokens ({len(self.data.train):,} sequences), val {self.data.val_tokens:,}"
            )
        if cfg.eval_every:
            data_line += f" (validation on {len(self.eval_batches)} batches of --eval-batches {cfg.eval_batches})"
        step_kind = "fast step" if self.loss_fn is not None else f"reference step ({self.why_not_fast})"
        self.logger.say(
            f"model {model_config.num_parameters():,} parameters | device {metrics.device_name(self.device)} x{d.world_size} | {precision}, "
            f"{step_kind} | {self.per_step} x {cfg.seq_len} tokens per step | {data_line} | MFU peak {peak} | run dir {self.run_dir}"
        )
        warning = self.checkpointer.space_warning() if d.is_main else None
        if warning:
            self.logger.say(warning)
        if self.evaluator is not None:
            self.logger.say(self.evaluator.describe())
        if self.resumed_from is not None:
            self.logger.say(f"resumed from {self.resumed_from} at step {self.state.step} ({self.state.tokens:,} tokens seen)")

    # ---- the loop's verbs ----------------------------------------------------------------------------------

    def next_batches(self) -> list[tuple[torch.Tensor, ...]]:
        """This rank's micro-batches of the next step, from the run's position in the row order: (inputs,
        targets) windows of text, or (input_ids, labels, position_ids or None) rows of chat."""
        cfg, d, micro = self.cfg, self.d, []
        for m in range(cfg.grad_accum):
            start = 0 if cfg.overfit_single_batch else self.state.data_position + (m * d.world_size + d.rank) * cfg.batch_size
            batch = self.data.train.batch(self.order.indices(start, cfg.batch_size))
            micro.append(tuple(t.to(self.device, non_blocking=True) if t is not None else None for t in batch))
        return micro

    def step(self) -> dict:
        """One optimizer step; the run state advances and the step's metrics come back."""
        t0 = time.perf_counter()
        lr = lr_at(self.state.step, self.cfg, self.state.horizon)
        micro = self.next_batches()
        autocast = None if self.loss_fn is not None else self.autocast  # the fast step does its own mixed precision
        loss_fn, divide_by = self.loss_fn, None
        if self.chat:  # the sum over the step's trained tokens, all micro-batches and ranks, over their number
            trained = distributed.mean(self.d, trained_tokens(micro).float())  # all ranks' count / ranks: DDP averages
            loss_fn, divide_by = functools.partial(sft_loss_sum, self.model), float(trained)
        stats: StepStats = train_step(
            self.model,
            micro,
            self.optimizer,
            self.scaler,
            lr=lr,
            grad_clip=self.cfg.grad_clip,
            autocast=autocast,
            loss_fn=loss_fn,
            divide_by=divide_by,
        )
        loss = float(distributed.mean(self.d, stats.loss))
        elapsed = time.perf_counter() - t0
        self.state.advance(self.per_step, self.cfg.seq_len)
        rate, average = self.throughput.update(self.per_step * self.cfg.seq_len, elapsed)
        values = {
            "loss": loss,
            "lr": lr,
            "grad_norm": stats.grad_norm,
            "step_time": elapsed,
            "tokens_per_sec": rate,
            "avg_tokens_per_sec": average,
            "tokens": self.state.tokens,
            "epoch": self.order.epoch(self.state.data_position),
        }
        if self.peak:
            values["mfu"] = self.flops_per_token * rate / (self.peak * self.d.world_size)
        if divide_by is not None:
            values["trained_tokens"] = round(divide_by * self.d.world_size)
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
        self.logger.step(step, values)
        if self.bad_steps >= self.cfg.max_bad_steps and self.scaler is None:
            raise Diverged(
                f"training diverged: {self.bad_steps} non-finite steps in a row up to step {step}; lower --lr, raise --warmup-steps, "
                f"or use --precision fp32, then --resume from the last good checkpoint"
            )

    def validate(self) -> None:
        if not self.eval_batches:
            return
        if self.chat:  # assistant-only: summed over every rank's trained tokens, then divided once
            total, count = evaluate_chat(self.raw_model, self.data.val, self.eval_batches, self.device, self.autocast)
            self.last_val = float(distributed.mean(self.d, total)) / max(float(distributed.mean(self.d, count.float())), 1e-9)
        else:
            loss = evaluate(self.raw_model, self.data.val, self.eval_batches, self.device, self.autocast)
            self.last_val = float(distributed.mean(self.d, loss))
        figures = self.evaluator(self.raw_model, self.autocast) if self.evaluator is not None else {}
        self.logger.validation(self.state.step, self.last_val, figures)

    def sample(self) -> None:
        """A sample of the model at this step, drawn as --sample-temperature and --sample-top-k say, from its own
        generator seeded by --seed and the step (a resumed run draws what the straight one drew)."""
        cfg, step = self.cfg, self.state.step
        top_k = cfg.sample_top_k or None
        sampling = Sampling(cfg.sample_temperature, top_k, sample_seed(cfg.seed, step))
        prompt = _sample_prompt(cfg, self.chat)
        if self.chat:
            reply = sample_chat(self.raw_model, self.tokenizer, prompt, cfg.sample_tokens, self.device, self.autocast, sampling)
            self.logger.sample(step, f"user: {prompt}\nassistant: {reply}", sampling)
            return
        stop_id = data.separator_id(self.tokenizer)
        text = sample_text(
            self.raw_model, self.tokenizer, prompt, cfg.sample_tokens, self.device, self.autocast, sampling, stop_id
        )
        self.logger.sample(step, prompt + text, sampling)

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
        for name in ("metrics.jsonl", checkpoint.TRAIN_CONFIG):
            (self.run_dir / name).unlink(missing_ok=True)
        return f"removed the metrics.jsonl and {checkpoint.TRAIN_CONFIG} this run had written in {self.run_dir}; run the same command again to start over"
