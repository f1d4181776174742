"""bench/eval_throughput.py's pieces on a tiny model and a couple of items: both sides score the same pairs,
the comparison notices a difference, the table and JSON come out, bad options are one-line errors. (Speed is
never asserted here: the figures are the benchmark's to report.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import smollm_ref
from bench import eval_throughput as bench
from smollm_ref.model import LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = LlamaForCausalLM(tiny_config(vocab_size=49152, initializer_range=0.3, max_position_embeddings=1024)).eval()
    return model, smollm_ref.load_tokenizer()


@pytest.fixture(scope="module")
def work():
    return bench.load_work(["hellaswag", "arc_easy"], 2)


def test_both_sides_score_every_choice_alike(tiny, work):
    model, tokenizer = tiny
    lm = bench.lmeval_model(smollm_ref.to_transformers(model).eval(), tokenizer, batch_size=3)
    ours, theirs = bench.ours_fn(model, tokenizer, work, 2)(), bench.lmeval_fn(lm, work)()
    assert set(ours) == set(theirs) == {"hellaswag", "arc_easy"}
    for name, docs in work.items():
        assert [len(x) for x in ours[name]] == [len(x) for x in theirs[name]] == [len(d.choices) for d in docs]
    found = bench.compare(work, ours, theirs)
    # float32, lm_head on gathered rows against lm-eval's full logits: tests/test_evaluate_lmeval.py's RTOL
    assert found["same_predictions"] and found["differing"] == [] and 0 < found["max_rel_ll_diff"] <= 1e-6


def test_compare_names_the_items_whose_predictions_differ(work):
    ours = {name: [[-1.0 * (j + 1) * len(c) for j, c in enumerate(d.choices)] for d in docs] for name, docs in work.items()}
    theirs = json.loads(json.dumps(ours))
    theirs["arc_easy"][1] = theirs["arc_easy"][1][::-1]  # the other end wins on both scores
    found = bench.compare(work, ours, theirs)
    assert not found["same_predictions"] and found["differing"] == ["arc_easy:1"]
    assert found["max_abs_ll_diff"] == max(abs(a - b) for a, b in zip(ours["arc_easy"][1], theirs["arc_easy"][1]))


def test_a_precision_row_times_both_sides_and_checks_their_predictions(tiny, work):
    model, tokenizer = tiny
    calls = []
    row = bench.bench_precision(model, tokenizer, work, "bf16", 2, 2, torch.device("cpu"), lambda: calls.append(1))
    assert len(calls) == 2 * (2 + 1)  # a warm-up and two rounds per side
    assert row["items"] == 4 and row["precision"] == "bf16" and row["smollm_ref"]["seconds"]["n"] == 2
    assert row["ratio"]["median"] > 0 and row["lm_eval"]["items_per_s"]["median"] > 0
    assert set(row) >= {"same_predictions", "differing", "max_abs_ll_diff", "max_rel_ll_diff"}
    assert next(model.parameters()).dtype == torch.float32  # cast on a copy


def test_main_writes_the_table_and_json(tiny, tmp_path, capsys):
    model, tokenizer = tiny
    smollm_ref.save_pretrained(model, tmp_path / "m", tokenizer)
    out = tmp_path / "r.json"
    args = ["--model", str(tmp_path / "m"), "--tasks", "piqa", "--items", "2", "--precision", "fp32,bf16", "--runs", "1"]
    assert bench.main([*args, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    fp32, bf16 = results["rows"]
    assert results["items"] == {"piqa": 2} and fp32["same_predictions"] and results["env"]["lm_eval"]
    assert "changed_from_fp32" not in fp32 and set(bf16["changed_from_fp32"]) == {"smollm_ref", "lm_eval"}
    assert not any("_outputs" in row for row in results["rows"])  # the log-likelihoods stay out of the JSON
    table = capsys.readouterr().out
    assert "| fp32 |" in table and "| yes |" in table and results["env"]["cpu"]["model"] in table
    assert "bf16: items whose predictions differ from fp32's: smollm_ref" in table


@pytest.mark.parametrize(
    "args, message",
    [(["--tasks", "nope"], "--tasks"), (["--precision", "fp8"], "--precision"), (["--items", "0"], "--items"),
     (["--runs", "0"], "--runs"), (["--json", "/no/such/folder/r.json"], "--json")],
)  # fmt: skip
def test_bad_options_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_runs_as_a_script_from_the_repository_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "bench/eval_throughput.py", "--help"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python bench/eval_throughput.py")
