"""Zero-shot multiple-choice figures at every validation (`--eval-tasks`, `--eval-limit`): the tasks are read
and tokenised once, when the run is built; each validation asks the model for the choices' log-likelihoods
(`smollm_ref.evaluate.scoring`) and scores them as `smollm_ref.evaluate.evaluate` does, so that a checkpoint
evaluated afterwards with `python -m smollm_ref.evaluate --tasks ... --limit N` (fp32; `--chat-template` for a
chat run) gives the same figures."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..evaluate import prepare, score_docs
from ..evaluate.scoring import Encoded, loglikelihoods
from ..evaluate.tasks import Doc, TaskError
from .options import EvalOptions, TrainError

BATCH_SIZE = 16  # items scored together: python -m smollm_ref.evaluate's default, so its batches are these
FIGURES = ("acc_norm_nospace", "acc")  # the model card's figure first: the log line shows it


def metric_name(task: str, figure: str) -> str:
    """The key of a task's figure in metrics.jsonl and WandB: eval/TASK/FIGURE (WandB groups eval/ in a section)."""
    return f"eval/{task}/{figure}"


@dataclass(frozen=True)
class _Task:
    name: str
    docs: list[Doc]
    items: list[Encoded]


class Evaluator:
    """The --eval-tasks benchmarks of a run, read once. Calling it scores the model on them and returns
    {eval/TASK/acc_norm_nospace, eval/TASK/acc: fraction 0..1}.

    Every rank scores every item (the figures agree across ranks; the main rank's logger records them):
    under FSDP the forward passes are collectives that every rank must join, and under DDP no rank waits
    idle at the next collective while another scores."""

    def __init__(self, tasks: list[_Task], chat: bool = False):
        self.tasks = tasks
        self.chat = chat

    @classmethod
    def build(cls, options: EvalOptions, tokenizer, max_positions: int, chat: bool = False) -> Evaluator | None:
        """The run's evaluator from its `cfg.eval` (None without --eval-tasks): every task's first --eval-limit
        documents, tokenised with the run's tokenizer and cut to the model's positions as evaluate() cuts them.
        A `chat` run's model is asked each question as a user message in the tokenizer's chat template, the
        choices after the assistant's turn begins (evaluate's `chat_template`: how the model card scores
        SmolLM2's instruct models). Raises TrainError (one line) for a task file that cannot be read or
        evaluation data that is missing."""
        if not options.eval_tasks.strip():
            return None
        try:
            prepared = prepare(tokenizer, options.eval_tasks, max_positions, options.eval_limit or None, chat_template=chat)
            tasks = [_Task(task.name, docs, items) for task, docs, items in prepared]
        except (TaskError, ValueError) as e:  # ValueError: a choice the tokenizer encodes to nothing, or too long
            fix = "or" if ";" in str(e) else "fix the task, or"  # most messages say already what to do
            raise TrainError(
                f"--eval-tasks {options.eval_tasks}: {e}; {fix} pass --eval-tasks '' to train without benchmarks"
            ) from None
        return cls(tasks, chat)

    def describe(self) -> str:
        """The start-up line: what is scored at each validation and how many items of each task."""
        tasks = ", ".join(f"{t.name} ({len(t.docs)} items)" for t in self.tasks)
        cut = sum(item.truncated for t in self.tasks for item in t.items)
        note = f"; {cut} contexts cut to the model's positions" if cut else ""
        how = " (each question in the chat template)" if self.chat else ""
        return f"zero-shot benchmarks at each validation{how}: {tasks}{note} -> eval/TASK/acc_norm_nospace, eval/TASK/acc"

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, autocast) -> dict[str, float]:
        """Score `model` (the plain module, FSDP-sharded or not) in eval mode under the run's `autocast`;
        its training flag is restored."""
        was_training = model.training
        model.eval()
        values = {}
        try:
            with _unsharded(model), autocast:
                for task in self.tasks:
                    figures, _ = score_docs(task.docs, loglikelihoods(model, task.items, BATCH_SIZE))
                    values.update({metric_name(task.name, f): figures[f] for f in FIGURES})
        finally:
            model.train(was_training)
        return values


def brief(figures: dict[str, float]) -> str:
    """The validation line's part: 'acc_norm_nospace arc_easy 31.0% piqa 55.2%' (empty without figures)."""
    suffix = "/acc_norm_nospace"
    shown = [f"{k[len('eval/') : -len(suffix)]} {100 * v:.1f}%" for k, v in figures.items() if k.endswith(suffix)]
    return f"acc_norm_nospace {' '.join(shown)}" if shown else ""


@contextlib.contextmanager
def _unsharded(model: torch.nn.Module):
    """Under FSDP2, the root's own parameters (embedding, final norm, lm_head) gathered whole while scoring:
    scoring calls `model.model` and `model.lm_head` directly, past the root's forward hook that gathers them
    (the decoder layers gather their own in their hooks). Elsewhere, nothing."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
