"""Preference tuning: DPO and its IPO and APO-zero variants on pairs of chosen and rejected responses
(`smollm_ref.data.preferences`), with the losses and metrics of TRL's `DPOTrainer` (TRL 1.16) under its names.

The reference model is the initial model, frozen. Its summed log-probability of each response is computed once,
before the first step, and kept with the pairs (and in every checkpoint, so a resumed run keeps the reference of
the run's start): a training step holds one model. For a pair with policy log-probabilities (c, r) and the
reference's (c0, r0), the log-ratios are c - c0 and r - r0, the rewards beta x those, and the loss
    sigmoid    -log sigmoid(beta ((c - c0) - (r - r0)))                                  (DPO)
    ipo        ((c - c0) / |chosen| - (r - r0) / |rejected| - 1 / (2 beta))^2            (IPO; |x|: tokens, as TRL)
    apo_zero   1 - sigmoid(beta (c - c0)) + sigmoid(beta (r - r0))                      (APO-zero)
A step's loss is the mean over all its pairs (every micro-batch and rank), as TRL's is the mean over a batch.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from ... import distributed, lora
from ...data.preferences import CONVERSATIONS, PreferenceData, PreferenceRows, preference_data, preference_format
from ...model import IGNORE_INDEX
from ..options import DataOptions, LogOptions, PreferenceOptions, TrainError
from ..samples import Sampling, sample_prompt_text
from .base import StepLoss, in_eval_mode, split_digest
from .chat import CHAT_SAMPLE_QUESTION, chat_prompt_ids, sample_chat
from .text import sample_text, text_prompt_ids

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, tokens), each (R,): per row, the summed log-probability of its labelled tokens (labels[t + 1] scored
    by the logits at t; float32) and the number of labelled tokens (what IPO divides by: TRL's completion mask)."""
    logits = model(input_ids).logits  # (R, T, V)
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(shifted.shape).sum(1), (labels != IGNORE_INDEX).sum(1)


def pair_losses(loss_type: str, beta: float, policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B,) loss of each pair; `policy`, `reference` and `tokens` are (B, 2): chosen, rejected."""
    ratios = policy - reference  # (B, 2) log-probability ratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1]))
    if loss_type == "ipo":
        per_token = ratios / tokens.clamp(min=1)
        return (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * ratios[:, 0]) + torch.sigmoid(beta * ratios[:, 1])
    raise ValueError(f"unknown preference loss {loss_type!r}; expected sigmoid, ipo or apo_zero")


def metric_sums(beta: float, policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(6,) sums over the pairs of the `METRICS`, in their order (divided by the number of pairs: TRL's means)."""
    rewards = beta * (policy - reference).detach()
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    columns = (chosen, rejected, (chosen > rejected).float(), chosen - rejected, policy[:, 0].detach(), policy[:, 1].detach())
    return torch.stack([c.sum() for c in columns])


class PairLoss:
    """A step's loss function (`StepLoss.loss_fn`): the summed loss of a micro-batch's pairs. It adds up the
    pairs' metrics and losses for `summary` and `mean_loss`."""

    def __init__(self, model, options: PreferenceOptions):
        self.model, self.options = model, options
        self.sums: torch.Tensor | None = None  # (8,): the METRICS' sums, the losses' sum, the number of pairs

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        logps, tokens = sequence_logps(self.model, input_ids, labels)
        policy, tokens = logps.view(2, -1).T, tokens.view(2, -1).T  # (B, 2): the chosen rows come first
        losses = pair_losses(self.options.loss_type, self.options.beta, policy, reference.to(policy.dtype), tokens)
        sums = metric_sums(self.options.beta, policy, reference.to(policy.dtype))
        sums = torch.cat([sums, losses.detach().sum().view(1), losses.new_tensor([len(losses)])])
        self.sums = sums if self.sums is None else self.sums + sums
        return losses.sum()

    def summary(self, d: distributed.Dist, prefix: str = "") -> dict:
        """The METRICS as means over every pair seen, all ranks."""
        sums = distributed.mean(d, self.sums)
        return {prefix + name: float(value) for name, value in zip(METRICS, sums[:-2] / sums[-1])}

    def mean_loss(self, d: distributed.Dist) -> float:
        """The mean loss over every pair seen, all ranks."""
        sums = distributed.mean(d, self.sums)
        return float(sums[-2] / sums[-1])


def as_reference(model):
    """A context in which `model` computes DPO's reference, the initial model: with LoRA adapters, the frozen base
    under them (`lora.adapters_disabled`: no copy of the model); otherwise `model` as it is, which before the first
    step is the initial model."""
    return lora.adapters_disabled(model)


@torch.no_grad()
def reference_logps(model, rows: PreferenceRows, batch_size: int, device, autocast, d: distributed.Dist) -> torch.Tensor:
    """(pairs, 2) float32 on the CPU: the summed log-probabilities of each pair's chosen and rejected response
    under `model`, in eval mode, `batch_size` pairs at a time. The ranks share the batches; a rank short of one
    repeats its first (and drops the result), so every rank runs as many forward passes (FSDP's are collective)."""
    n = len(rows)
    starts = list(range(0, n, batch_size))
    out = torch.zeros(n, 2, device=device)

    def run():
        for round_ in range(-(-len(starts) // d.world_size)):
            k = round_ * d.world_size + d.rank
            indices = range(starts[k], min(starts[k] + batch_size, n)) if k < len(starts) else range(min(batch_size, n))
            input_ids, labels, _ = rows.batch(indices)
            with autocast:
                logps, _ = sequence_logps(model, input_ids.to(device), labels.to(device))
            if k < len(starts):
                out[list(indices)] = logps.float().view(2, -1).T
        return out

    if n:
        with as_reference(model):
            in_eval_mode(model, run)
    # each pair was written by one rank, the others hold zeros there: the sum over ranks gathers them exactly
    return distributed.total(d, out).cpu()


class PreferenceObjective:
    """Preference tuning (DPO) on pairs: micro-batches of (input_ids, labels, reference), 2B rows for B pairs;
    the loss summed over a step's pairs and divided once by their number (all micro-batches and ranks); the
    reward metrics in the step's record and on the held-out pairs; samples before and after, answering in the
    chat template for conversations, continuing --sample-prompt for strings."""

    name = "preference"
    sequences_per_row = 2  # the chosen and the rejected response
    shown_metrics = ("rewards/accuracies", "rewards/margins")
    sample_at_start = True  # a reply before tuning, to compare with the ones after
    fast_step_unsupported = "the fast step does not take preference pairs yet"
    rows = "pairs"
    budget = None  # every pair is read

    def __init__(self, options: DataOptions, loss: PreferenceOptions, tokenizer):
        self.options, self.loss, self.tokenizer = options, loss, tokenizer
        # the first record's format, read before the data: samples and benchmarks use the chat template for conversations
        self.chat_template = preference_format(options.data) == CONVERSATIONS
        self.sample_prompt_name = (
            "the chat sample's prompt (the question in the chat template)" if self.chat_template else "--sample-prompt"
        )
        self.data: PreferenceData | None = None
        self.saved: dict | None = None  # a resumed run's checkpoint state

    def read(self, d: distributed.Dist, saved: dict | None, vocab_size: int) -> PreferenceData:
        o = self.options
        self.data = preference_data(o.data, self.tokenizer, o.seq_len, o.val_fraction, o.max_prompt_length)
        self.saved = saved
        return self.data

    def prepare(self, model, device, autocast, d: distributed.Dist) -> str | None:
        """The reference's log-probabilities: a resumed run's from its checkpoint (its model is no longer the
        initial one), a new run's computed now from the initial `model`."""
        train, val = self.data.train, self.data.val
        if self.saved is not None:
            saved = self.saved.get("reference_logps") or {}
            shapes = [tuple(saved[k].shape) if k in saved else None for k in ("train", "val")]
            if shapes != [(len(train), 2), (len(val), 2)]:
                raise TrainError(
                    "the checkpoint holds no reference log-probabilities for these pairs (a run of another objective, "
                    "or other data); start a new preference run from its weights with --init-from"
                )
            train.reference, val.reference = saved["train"].float(), saved["val"].float()
            return None
        start = time.perf_counter()
        for rows in (train, val):
            rows.reference = reference_logps(model, rows, self.options.batch_size, device, autocast, d)
        return (
            f"reference log-probabilities of {len(train) + len(val):,} pairs computed from the initial model in "
            f"{time.perf_counter() - start:.1f} s (kept with the pairs and in checkpoints)"
        )

    def checkpoint_state(self) -> dict:
        return {"reference_logps": {"train": self.data.train.reference, "val": self.data.val.reference}}

    def split_digest(self) -> dict:
        val = self.data.val
        rows = [(row, b"|") for part in (val.prompt, val.chosen, val.rejected) for row in part]
        return split_digest(len(self.data.train), len(val), rows)

    def announce(self) -> str | None:
        return self.data.describe() + f"; {self.loss.loss_type} loss, beta {self.loss.beta:g}"

    def describe(self) -> str:
        return f"train {len(self.data.train):,} pairs, val {len(self.data.val):,}"

    def sample_prompt(self, option: str) -> str:
        prompt = sample_prompt_text(option)
        return CHAT_SAMPLE_QUESTION if self.chat_template and prompt == LogOptions.sample_prompt else prompt

    def sample_prompt_ids(self, prompt: str) -> torch.Tensor:
        if self.chat_template:
            return chat_prompt_ids(self.tokenizer, prompt)
        return text_prompt_ids(self.tokenizer, prompt, self.tokenizer.eos_token_id)

    def step_loss(self, model, fast_loss, micro_batches: list, d: distributed.Dist) -> StepLoss:
        pairs = micro_batches[0][2].new_tensor(float(sum(len(reference) for _, _, reference in micro_batches)))
        loss = PairLoss(model, self.loss)
        # all ranks' pairs / ranks: DDP averages the ranks' gradients
        return StepLoss(loss, float(distributed.mean(d, pairs)), {}, summary=functools.partial(loss.summary, d))

    def validate(self, model, batches: list[list[int]], device, autocast, d: distributed.Dist) -> tuple[float, dict]:
        """The mean loss over the held-out pairs of `batches` (all ranks) and the METRICS on them, named
        val_rewards/chosen, ... (TRL's eval_rewards/chosen, as val_loss is its eval_loss)."""
        loss = PairLoss(model, self.loss)

        def losses():
            for indices in batches:
                batch = [t.to(device) for t in self.data.val.batch(indices)]
                with autocast:
                    loss(*batch)

        in_eval_mode(model, losses)
        return loss.mean_loss(d), loss.summary(d, prefix="val_")

    def sample(self, model, prompt: str, max_new_tokens: int, device, autocast, sampling: Sampling) -> str:
        if self.chat_template:
            reply = sample_chat(model, self.tokenizer, prompt, max_new_tokens, device, autocast, sampling)
            return f"user: {prompt}\nassistant: {reply}"
        eos = self.tokenizer.eos_token_id
        return prompt + sample_text(model, self.tokenizer, prompt, max_new_tokens, device, autocast, sampling, eos)
