"""The embedded preference set `stdlib-preferences` (issue 21): built from what ships with Python, the same in every
process, each pair a question's documented answer over another module's, no text in two pairs (so the trainer's
held-out tail shares nothing with training), read through the preference path as conversations."""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from smollm_ref.data import PREFERENCE_DATA
from smollm_ref.data.preferences import CONVERSATIONS, pair_of, preference_data, preference_format
from smollm_ref.data.sources import source_key
from smollm_ref.data.stdlib_preferences import MODULES, _questions, module_of, records
from smollm_ref.train.objectives import PreferenceObjective, choose
from smollm_ref.train.options import DataOptions

DIGEST = "import hashlib, json; from smollm_ref.data.{} import records; print(hashlib.sha256(json.dumps(records()).encode()).hexdigest())"


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return records()


def texts(record: dict) -> tuple[str, str, str]:
    return tuple(record[key][0]["content"] for key in ("prompt", "chosen", "rejected"))


@pytest.mark.parametrize("module", ["stdlib_chat", "stdlib_preferences"])
def test_the_set_is_the_same_in_every_process(module):
    """Built in two fresh processes (other memory layouts: a default value's repr with its address would differ; it
    did in stdlib-chat, whose split digest then changed between a run and its resume), the records are the same, and
    the same as here."""
    here = importlib.import_module(f"smollm_ref.data.{module}").records()
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    digests = {
        subprocess.run(
            [sys.executable, "-c", DIGEST.format(module)], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert digests == {hashlib.sha256(json.dumps(here).encode()).hexdigest()}
    assert " at 0x" not in json.dumps(here)


def test_each_pair_prefers_the_questions_own_answer_to_another_modules(pairs):
    module_of_answer = {answer: module for module, _, answer in _questions()}
    answer_of = {question: answer for _, question, answer in _questions()}
    for record in pairs:
        kind, prompt, chosen, rejected = pair_of(record)  # a valid conversational pair: chosen != rejected
        assert kind == CONVERSATIONS and [m["role"] for m in prompt] == ["user"]
        question, chosen, rejected = texts(record)
        assert chosen == answer_of[question] and rejected != chosen
        assert module_of_answer[rejected] != module_of(question)


def test_no_text_is_in_two_pairs_so_no_held_out_pair_leaks_into_training(pairs):
    """Every prompt, chosen and rejected reply appears once in the whole set: whatever tail --val-fraction holds
    out, its pairs share no text with the training pairs. Checked for the quick start's split too, through the
    trainer's own reader (the last 10% of the pairs, in token ids)."""
    every = [text for record in pairs for text in texts(record)]
    assert len(every) == len(set(every))
    from smollm_ref.tokenizer import load_tokenizer

    data = preference_data(PREFERENCE_DATA, load_tokenizer(), 256, 0.1)
    assert (len(data.train), len(data.val)) == (len(pairs) - round(0.1 * len(pairs)), round(0.1 * len(pairs)))
    assert data.counts["prompt_cut"] == data.counts["response_cut"] == 0  # the quick start's --seq-len 256 cuts nothing
    for part in ("chosen", "rejected"):
        held_out = {tuple(p + r) for p, r in zip(data.val.prompt, getattr(data.val, part))}
        trained = {tuple(p + r) for rows in (data.train.chosen, data.train.rejected) for p, r in zip(data.train.prompt, rows)}
        assert not held_out & trained
    assert not {tuple(p) for p in data.val.prompt} & {tuple(p) for p in data.train.prompt}


def test_sizes(pairs):
    """Half the questions are asked (a few hundred pairs: the quick start holds out 10% and trains on the rest), every
    module of the chat set is asked about or answers, and each unasked answer is used at most once."""
    questions = _questions()
    assert 300 <= len(pairs) and len(questions) // 2 - 2 <= len(pairs) <= (len(questions) + 1) // 2
    asked = {module_of(texts(record)[0]) for record in pairs}
    assert len(asked) > 0.8 * len(MODULES)


def test_it_is_read_as_conversational_preference_data_without_a_download():
    from smollm_ref.tokenizer import load_tokenizer

    assert preference_format(PREFERENCE_DATA) == CONVERSATIONS
    objective = choose(DataOptions(data=PREFERENCE_DATA), load_tokenizer(), max_steps=1, progress=False)
    assert isinstance(objective, PreferenceObjective) and objective.chat_template
    assert source_key(PREFERENCE_DATA) != source_key("stdlib-chat")
