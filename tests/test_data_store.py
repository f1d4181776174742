"""Token stores (issue 12): `prepare` tokenises like the tokenizer itself does, whatever the shard size and
worker count; budgets; an interrupted prepare continues to the same store; hf: specs with configurations,
splits and fields read from a local folder laid out like HuggingFaceTB/smollm-corpus; bad input; and the
trainer on a multi-shard store, resuming exactly across a shard boundary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trainer_runs import FORMAT1, argv, losses, tiny_options

from smollm_ref import checkpoint, data, train
from smollm_ref.train import TrainConfig
from smollm_ref.weights import read_state_dict

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    from smollm_ref.tokenizer import load_tokenizer

    return load_tokenizer(str(FORMAT1 / "step_000002"))  # a 300-token byte-level BPE: fast, and ids fit uint16


def jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


def expected_tokens(tok, docs: list[str]) -> list[int]:
    """The independent path: the transformers tokenizer on each document, then the separator."""
    sep = data.separator_id(tok)
    return [t for d in docs for t in tok(d, add_special_tokens=False).input_ids + [sep]]


# prepare tokenises as the tokenizer does


@settings(deadline=None, max_examples=15)
@given(
    docs=st.lists(st.text(min_size=0, max_size=80), min_size=1, max_size=12),
    shard_tokens=st.integers(1, 64),
    budget=st.one_of(st.none(), st.integers(1, 200)),
)
def test_store_tokens_equal_the_tokenizer_on_each_document(tok, tmp_path_factory, docs, shard_tokens, budget):
    tmp = tmp_path_factory.mktemp("p")
    expected = expected_tokens(tok, docs)
    want = expected[:budget] if budget is not None else expected
    if all(t == data.separator_id(tok) for t in want):  # empty documents, or a budget that reaches none of the text
        with pytest.raises(data.DataError, match="holds no text to train on"):
            data.prepare(str(jsonl(tmp / "c.jsonl", docs)), tmp / "s", tok, budget=budget, workers=1, progress=False)
        return
    store = data.prepare(
        str(jsonl(tmp / "c.jsonl", docs)), tmp / "s", tok, budget=budget, workers=1, shard_tokens=shard_tokens, progress=False
    )
    assert np.asarray(store.tokens()).tolist() == want
    assert all(s["tokens"] == shard_tokens for s in store.shards[:-1]) and 0 < store.shards[-1]["tokens"] <= shard_tokens
    assert store.num_tokens == len(want) and store.index["exhausted"] == (budget is None or budget >= len(expected))
    store.verify()


@settings(deadline=None, max_examples=40)
@given(lengths=st.lists(st.integers(0, 20), min_size=1, max_size=6), data_=st.data())
def test_sharded_tokens_slice_like_one_array(lengths, data_):
    arrays = [np.arange(sum(lengths[:i]), sum(lengths[: i + 1]), dtype=np.uint16) for i in range(len(lengths))]
    whole = np.concatenate(arrays)
    tokens = data.ShardedTokens(arrays)
    a = data_.draw(st.integers(0, len(whole)))
    b = data_.draw(st.integers(a, len(whole)))
    c = data_.draw(st.integers(0, b - a))
    view = tokens[a:b]
    assert len(view) == b - a and np.asarray(view).tolist() == whole[a:b].tolist()
    assert np.asarray(view[c:], dtype=np.int64).tolist() == whole[a + c : b].tolist()


def test_two_workers_write_the_same_store_as_one(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(data.tokenise, "BATCH_DOCS", 3)  # many small batches in flight
    docs = [f"def f{i}():\n    return {i * 7919} # é 中 \n" * (i % 5 + 1) for i in range(200)]
    spec = str(jsonl(tmp_path / "c.jsonl", docs))
    one = data.prepare(spec, tmp_path / "one", tok, workers=1, shard_tokens=500, progress=False)
    two = data.prepare(spec, tmp_path / "two", tok, workers=2, shard_tokens=500, progress=False)
    assert [s["sha256"] for s in one.shards] == [s["sha256"] for s in two.shards] and len(one.shards) > 3
    assert np.asarray(one.tokens()).tolist() == expected_tokens(tok, docs)


def test_a_budget_larger_than_the_data_warns_and_keeps_what_there_is(tok, tmp_path, capsys):
    store = data.prepare(
        str(jsonl(tmp_path / "c.jsonl", ["abc", "def"])), tmp_path / "s", tok, budget=10_000, workers=1, progress=False
    )
    assert store.num_tokens == len(expected_tokens(tok, ["abc", "def"])) and store.index["exhausted"]
    assert f"ran out at {store.num_tokens:,} tokens, before the budget of 10,000" in capsys.readouterr().err


# an interrupted prepare


def test_a_killed_prepare_continues_to_the_store_an_uninterrupted_one_makes(tmp_path):
    docs = [f"line {i} " * 40 + "\n" for i in range(400)]
    spec = str(jsonl(tmp_path / "c.jsonl", docs))
    tokenizer = str(FORMAT1 / "step_000002")
    args = ["prepare", spec, "--tokenizer", tokenizer, "--workers", "1", "--shard-tokens", "5000", "--no-progress"]
    command = [sys.executable, "-m", "smollm_ref.data", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    # SIGKILLed at a fixed point, not after a wait: as the third shard is about to be renamed into place
    # (its temporary written), so the outcome never depends on the machine's speed
    kill_at_third_shard = (
        "import os, signal, sys; from smollm_ref.data import tokenise, __main__ as cli; real = tokenise._ShardWriter.close; "
        "n = [0]; tokenise._ShardWriter.close = lambda self, pos: (n.__setitem__(0, n[0] + 1), "
        "os.kill(os.getpid(), signal.SIGKILL) if n[0] == 3 else real(self, pos)); sys.exit(cli.main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", kill_at_third_shard, *command[3:], "--out", str(killed), "--no-progress"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    assert proc.wait() == -signal.SIGKILL
    left = sorted(p.name for p in killed.glob("shard_*"))
    assert left == ["shard_000000.bin", "shard_000001.bin", f"shard_000002.bin.tmp{proc.pid}"]  # swept on continuing
    assert (killed / "progress.json").is_file() and not (killed / "index.json").exists()
    with pytest.raises(data.DataError, match="unfinished token store"):
        data.Store(killed)  # never mistaken for a finished store
    resumed = subprocess.run([*command, "--out", str(killed)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run([*command, "--out", str(tmp_path / "straight")], env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    a, b = data.Store(killed), data.Store(tmp_path / "straight")
    assert len(a.shards) > 3 and [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    assert a.num_tokens == b.num_tokens
    assert not list(killed.glob("*.tmp*")) and not (killed / "progress.json").exists()


# hf: specs from a local folder laid out like smollm-corpus


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory) -> Path:
    """Two configurations of parquet files and a README declaring them, as HuggingFaceTB/smollm-corpus has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("smollm-corpus")
    for config in ("cosmopedia-v2", "python-edu"):
        (root / config).mkdir()
        for shard in range(2):
            texts = [f"{config} document {shard}-{i}: " + "the cat sat on the mat. " * (i + 1) for i in range(10)]
            pq.write_table(
                pa.table({"text": texts, "id": list(range(10))}), root / config / f"train-0000{shard}-of-00002.parquet"
            )
    (root / "empty").mkdir()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), root / "empty" / "train-00000-of-00001.parquet")
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n"
        for c in ("cosmopedia-v2", "python-edu", "empty")
    )
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    return root


def test_hf_spec_names_a_configuration_and_a_split(corpus_folder):
    docs = data.read_documents(f"hf:{corpus_folder}:python-edu")
    assert len(docs) == 20 and all(d.startswith("python-edu document") for d in docs)
    assert data.read_documents(f"hf:{corpus_folder}:cosmopedia-v2@train")[0].startswith("cosmopedia-v2 document 0-0")
    assert data.HFSpec.parse("hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2") == data.HFSpec(
        "HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "train"
    )
    assert data.HFSpec.parse("hf:org/name@validation") == data.HFSpec("org/name", None, "validation")


@pytest.mark.parametrize(
    ("suffix", "field", "message"),
    [
        (":nope", "text", r"has no configuration 'nope'; it has cosmopedia-v2, python-edu, empty"),
        (":python-edu", "body", r"has no 'body' field \(it has id, text\)"),
        (":python-edu@test", "text", r"has no split 'test'"),
        (":empty", "text", r"has no records"),
    ],
)
def test_hf_spec_bad_input_is_one_clear_error(corpus_folder, suffix, field, message):
    with pytest.raises(data.DataError, match=message):
        data.read_documents(f"hf:{corpus_folder}{suffix}", field)


def test_an_empty_json_dataset_is_one_clear_error(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(data.DataError, match=r"has no records; check the configuration and split"):
        data.read_documents(f"hf:{tmp_path}")


def test_a_hub_id_without_network_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(data.DataError, match="HuggingFaceTB/smollm-corpus") as info:
        data.read_documents("hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2")
    assert "\n" not in str(info.value)


def test_prepare_command_on_an_hf_spec_with_a_budget(corpus_folder, tmp_path):
    out = tmp_path / "store"
    command = [sys.executable, "-m", "smollm_ref.data", "prepare", f"hf:{corpus_folder}:python-edu", "--out", str(out)]
    command += [
        "--tokenizer",
        str(FORMAT1 / "step_000002"),
        "--tokens",
        "300",
        "--workers",
        "2",
        "--shard-tokens",
        "128",
        "--no-progress",
    ]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    store = data.Store(out)
    assert store.num_tokens == 300 and [s["tokens"] for s in store.shards] == [128, 128, 44] and not store.index["exhausted"]
    assert store.index["spec"] == f"hf:{corpus_folder}:python-edu" and "train with --data" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens", "0"], "must be a positive number"),
        (["--tokens", "-5"], "must be a positive number"),
        (["--workers", "0"], "must be a positive number"),
    ],
)
def test_prepare_command_refuses_bad_numbers(tmp_path, args, message):
    done = subprocess.run(
        [sys.executable, "-m", "smollm_ref.data", "prepare", "stdlib", "--out", str(tmp_path / "s"), *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s").exists()


# bad stores


def test_a_corrupt_shard_and_a_store_of_another_tokenizer_are_refused(tok, tmp_path):
    store = data.prepare(
        str(jsonl(tmp_path / "c.jsonl", ["hello world"] * 50)), tmp_path / "s", tok, shard_tokens=64, workers=1, progress=False
    )
    shard = store.dir / store.shards[1]["file"]
    blob = bytearray(shard.read_bytes())
    blob[3] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(data.DataError, match=f"{shard}.*does not match its checksum"):
        data.Store(store.dir).verify()
    shard.write_bytes(bytes(blob[:-2]))
    with pytest.raises(data.DataError, match="its index says"):
        data.Store(store.dir)

    from smollm_ref.tokenizer import load_tokenizer

    other = data.prepare(
        str(jsonl(tmp_path / "d.jsonl", ["hello"])), tmp_path / "o", tok, tokenizer_source="tiny-bpe", workers=1, progress=False
    )
    gpt2ish = load_tokenizer()  # SmolLM2's own: another fingerprint
    with pytest.raises(data.DataError, match=r"made with another tokenizer \(tiny-bpe\); train it with --tokenizer tiny-bpe"):
        other.check_tokenizer(gpt2ish)


def test_prepare_into_a_directory_that_is_not_a_store_is_refused(tok, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("mine")
    with pytest.raises(data.DataError, match="not a token store"):
        data.prepare(str(jsonl(tmp_path / "c.jsonl", ["x"])), tmp_path / "s", tok, workers=1, progress=False)
    assert (tmp_path / "s" / "keep.txt").read_text() == "mine" and [p.name for p in (tmp_path / "s").iterdir()] == ["keep.txt"]


# the trainer on a store


def options(store: Path, out: Path, **changes) -> dict:
    return tiny_options(out.parent, **{"data": str(store), "out_dir": str(out), "max_steps": 6, "checkpoint_every": 3, **changes})


def test_training_on_a_multi_shard_store_resumes_exactly_across_a_shard_boundary(tok, tmp_path):
    docs = [(FORMAT1 / "corpus.txt").read_text()[i * 500 : (i + 1) * 500] for i in range(24)]
    store = data.prepare(
        str(jsonl(tmp_path / "c.jsonl", docs)), tmp_path / "store", tok, shard_tokens=97, workers=1, progress=False
    )
    assert len(store.shards) > 20  # every 2 x 33-token window spans shards, most of them a boundary
    straight = train.train(TrainConfig.from_options(**options(store.dir, tmp_path / "a")))
    half = train.train(TrainConfig.from_options(**options(store.dir, tmp_path / "b", max_steps=3)))
    cfg, found = train.resolve_config({"resume": str(half.run_dir), "max_steps": 6, "progress": False})
    train.train(cfg, found)

    assert losses(straight.run_dir) == losses(half.run_dir) and sorted(losses(half.run_dir)) == list(range(1, 7))
    a, b = (read_state_dict(r / "checkpoints" / "step_000006") for r in (straight.run_dir, half.run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.load_state(found)["data_key"] == data.Store(store.dir).key


def test_training_refuses_a_store_of_another_tokenizer_and_an_unfinished_one(tok, tmp_path, capsys):
    store = data.prepare(
        str(jsonl(tmp_path / "c.jsonl", ["hello world " * 300])), tmp_path / "store", tok, workers=1, progress=False
    )
    opts = options(store.dir, tmp_path / "run", tokenizer=None, model_config="smollm2-tiny")
    assert train.main([*argv(opts)]) == 2
    assert "made with another tokenizer" in capsys.readouterr().err and not (tmp_path / "run").exists()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(store.dir, unfinished)
    (unfinished / "index.json").rename(unfinished / "progress.json")
    assert train.main([*argv(options(unfinished, tmp_path / "run"))]) == 2
    assert "unfinished token store" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_streamed_spec_reads_what_the_run_needs_and_says_so(corpus_folder, tmp_path, capsys):
    opts = options(f"hf:{corpus_folder}:cosmopedia-v2", tmp_path / "run", max_steps=2, checkpoint_every=2, val_fraction=0.2)
    train.train(TrainConfig.from_options(**opts))
    needed = -(-(2 * 2 * 32 + 1) * 10 // 8)  # 2 steps x 2 sequences x 32 tokens + 1, over (1 - 0.2)
    assert f"streaming hf:{corpus_folder}:cosmopedia-v2 until {needed / 1e6:.1f} M tokens" in capsys.readouterr().err
    state = checkpoint.load_state(checkpoint.find(tmp_path / "run"))
    assert state["data_budget"] == needed
    cfg, found = train.resolve_config({"resume": str(tmp_path / "run"), "additional_steps": 1, "progress": False})
    train.train(cfg, found)  # the same store: the budget comes from the checkpoint
    assert checkpoint.load_state(checkpoint.find(tmp_path / "run"))["data_key"] == state["data_key"]


def test_two_gloo_ranks_resume_exactly_on_a_multi_shard_store(tok, tmp_path):
    """Both ranks memory-map the same store; the position saved is in the window order over all shards."""
    docs = [(FORMAT1 / "corpus.txt").read_text()[i * 500 : (i + 1) * 500] for i in range(24)]
    store = data.prepare(
        str(jsonl(tmp_path / "c.jsonl", docs)), tmp_path / "store", tok, shard_tokens=97, workers=1, progress=False
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "smollm_ref.train"]

    def run(*args):
        done = subprocess.run([*torchrun, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    run(*argv(options(store.dir, tmp_path / "straight", max_steps=4, checkpoint_every=2)))
    run(*argv(options(store.dir, tmp_path / "halves", max_steps=2, checkpoint_every=2)))
    run("--resume", str(tmp_path / "halves"), "--max-steps", "4", "--no-progress")

    assert losses(tmp_path / "straight") == losses(tmp_path / "halves") and sorted(losses(tmp_path / "halves")) == [1, 2, 3, 4]
    a, b = (read_state_dict(tmp_path / r / "checkpoints" / "step_000004") for r in ("straight", "halves"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.load_state(tmp_path / "halves" / "checkpoints" / "step_000004")["data_position"] == 4 * 2 * 2
