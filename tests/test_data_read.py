"""Reading training data from files (issue 18): every value read from a corpus is checked at the boundary
(a text field that is not a string is refused, never trained as its repr), and every bad line is one
`DataError` naming the file and the line (not UTF-8, not JSON, nested too deeply, not an object), in the
readers, in `prepare` and in the trainer, for text and chat data alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from trainer_runs import FORMAT1, argv, tiny_options

from smollm_ref import data, train
from smollm_ref.data.conversations import encode_records

REPO = Path(__file__).resolve().parent.parent
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit: json.loads raises RecursionError
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def lines(path: Path, *records) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records))
    return path


@pytest.fixture(scope="module")
def smollm_tok():
    from smollm_ref.tokenizer import load_tokenizer

    return load_tokenizer()


# text fields: a string or a refusal, never a repr


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "null"), (3, "a number"), (2.5, "a number"), (True, "a boolean"), (["a"], "an array"), ({"a": 1}, "an object")],
)
def test_a_jsonl_text_field_that_is_not_a_string_is_refused_naming_the_line(tmp_path, value, shown):
    corpus = lines(tmp_path / "c.jsonl", {"text": "fine"}, {"text": value})
    with pytest.raises(data.DataError) as e:
        data.read_documents(str(corpus))
    assert str(e.value) == (
        f"{corpus} line 2: field 'text' is {shown}, not a string; fix the record or set --text-field to the field holding the text"
    )


def test_a_parquet_text_field_that_is_not_a_string_is_refused_naming_the_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "nulls").mkdir()
    pq.write_table(pa.table({"text": pa.array(["one", None, "three"], pa.string())}), tmp_path / "nulls" / "train.parquet")
    (tmp_path / "numbers").mkdir()
    pq.write_table(pa.table({"text": [1, 2], "body": ["one", "two"]}), tmp_path / "numbers" / "train.parquet")
    with pytest.raises(data.DataError, match=r"^dataset hf:.*nulls@train record 2: field 'text' is null, not a string"):
        data.read_documents(f"hf:{tmp_path / 'nulls'}")
    with pytest.raises(data.DataError, match=r"record 1: field 'text' is a number, not a string; .* set --text-field"):
        data.read_documents(f"hf:{tmp_path / 'numbers'}")
    assert data.read_documents(f"hf:{tmp_path / 'numbers'}", text_field="body") == ["one", "two"]


# bad lines: one error naming the file and the line


def test_a_non_utf8_byte_names_the_file_and_the_line(tmp_path):
    corpus = lines(tmp_path / "c.jsonl", {"text": "fine"}, b'{"text": "caf\xe9"}')
    with pytest.raises(data.DataError) as e:
        data.read_documents(str(corpus))
    assert str(e.value) == f"{corpus} line 2 is not UTF-8 (byte 0xe9 at column 14); convert the file to UTF-8 or remove the line"


def test_a_line_nested_too_deeply_names_the_file_and_the_line(tmp_path, smollm_tok):
    corpus = lines(tmp_path / "c.jsonl", {"text": "fine"}, DEEP.encode())
    with pytest.raises(data.DataError, match=rf"^{corpus} line 2 nests JSON too deeply to read; fix the line$"):
        data.read_documents(str(corpus))
    chats = lines(tmp_path / "chat.jsonl", CHAT, DEEP.encode())
    with pytest.raises(data.DataError, match=rf"^{chats} line 2 nests JSON too deeply"):
        encode_records(str(chats), smollm_tok)
    first = lines(tmp_path / "first.jsonl", DEEP.encode())
    with pytest.raises(data.DataError, match=rf"^{first} line 1 nests JSON too deeply"):
        data.looks_like_chat(str(first))


def test_a_chat_record_that_is_not_an_object_names_its_line_and_type(tmp_path, smollm_tok):
    chats = lines(tmp_path / "chat.jsonl", CHAT, b"", [CHAT])
    with pytest.raises(data.DataError) as e:
        encode_records(str(chats), smollm_tok)
    assert str(e.value) == f"{chats} line 3: a chat record must be an object with a 'messages' list, got list"
    assert not data.looks_like_chat(str(lines(tmp_path / "first.jsonl", [CHAT])))


def test_a_bad_chat_record_of_a_dataset_names_its_record(tmp_path, smollm_tok):
    lines(tmp_path / "train.jsonl", CHAT, {"messages": [{"role": "user", "content": 5}]})
    with pytest.raises(data.DataError, match=r"^dataset hf:.*@train record 2: messages\[0\] \(user\) content must be a string"):
        encode_records(f"hf:{tmp_path}", smollm_tok)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_data_path_that_is_not_a_regular_file_is_not_called_missing(tmp_path, kind):
    path = Path("/dev/zero")
    if kind == "fifo":
        path = tmp_path / "pipe.txt"
        os.mkfifo(path)
    with pytest.raises(data.DataError) as e:
        data.read_documents(str(path))
    assert str(e.value).startswith(f"data path {path} is not a regular file or a directory; pass a file")


# the same through prepare and the trainer: exit 2, one line


def test_prepare_refuses_a_deep_line_and_a_null_text_in_one_line(tmp_path):
    for name, bad, words in [
        ("deep", DEEP.encode(), " nests JSON too deeply"),
        ("null", {"text": None}, ": field 'text' is null"),
    ]:
        corpus = lines(tmp_path / f"{name}.jsonl", {"text": "fine"}, bad)
        out = tmp_path / f"store-{name}"
        command = [sys.executable, "-m", "smollm_ref.data", "prepare", str(corpus), "--out", str(out), "--no-progress"]
        command += ["--tokenizer", str(FORMAT1 / "step_000002"), "--workers", "1"]
        done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        [line] = done.stderr.strip().splitlines()
        assert line.startswith(f"error: {corpus} line 2{words}"), line
        assert not (out / "index.json").exists()


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_the_trainer_refuses_a_deep_line_in_one_line(tmp_path, capsys, kind):
    corpus = lines(tmp_path / "c.jsonl", CHAT if kind == "chat" else {"text": "fine " * 200}, DEEP.encode())
    opts = tiny_options(tmp_path, data=str(corpus), data_format=kind)
    if kind == "chat":
        opts.update(model_config="smollm2-tiny", tokenizer=None, seq_len=64)
    assert train.main(argv(opts)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {corpus} line 2 nests JSON too deeply to read; fix the line"
    assert not (tmp_path / "run").exists()


# token stores: the index and the progress file, read bounded and checked value by value


@pytest.fixture(scope="module")
def tiny_tok():
    from smollm_ref.tokenizer import load_tokenizer

    return load_tokenizer(str(FORMAT1 / "step_000002"))


@pytest.fixture
def store(tmp_path, tiny_tok) -> Path:
    corpus = lines(tmp_path / "c.jsonl", *({"text": f"document {i} of a few words"} for i in range(8)))
    return data.prepare(str(corpus), tmp_path / "s", tiny_tok, shard_tokens=32, workers=1, progress=False).dir


def spoil_index(store: Path, change) -> dict:
    index = json.loads((store / "index.json").read_text())
    change(index)
    (store / "index.json").write_text(json.dumps(index))
    return index


def verify_command(store: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smollm_ref.data", "verify", str(store)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )


SPOILED_INDEXES = {
    "float dtype": (lambda i: i.update(dtype="float64"), "'dtype' is 'float64', not a token dtype (uint16 or uint32)"),
    "signed dtype": (lambda i: i.update(dtype="int8"), "'dtype' is 'int8', not a token dtype"),
    "object dtype": (lambda i: i.update(dtype=["uint16"]), "'dtype' is ['uint16'], not a token dtype"),
    "shard a number": (lambda i: i["shards"].insert(0, 7), "shards[0] is a number, not an object"),
    "shard a string": (lambda i: i["shards"].append("shard_000009.bin"), "is a string, not an object"),
    "shards an object": (lambda i: i.update(shards={"file": "x"}), "'shards' is an object, not a list"),
    "shard outside": (lambda i: i["shards"][0].update(file="../c.jsonl"), "shards[0] names no file inside the store"),
    "shard file a number": (lambda i: i["shards"][0].update(file=3), "shards[0] names no file inside the store (3)"),
    "shard tokens text": (lambda i: i["shards"][1].update(tokens="32"), "shards[1] 'tokens' is '32', not a whole number"),
    "shard tokens negative": (lambda i: i["shards"][1].update(tokens=-1), "shards[1] 'tokens' is -1, not a whole number"),
    "shard checksum": (lambda i: i["shards"][0].update(sha256=None), "shards[0] 'sha256' is None, not a SHA-256"),
    "total a float": (lambda i: i.update(shards=[], tokens=1e20), "'tokens' is 1e+20, not a whole number"),
    "total of no shards": (
        lambda i: i.update(shards=[], tokens=10**20),
        "says 100,000,000,000,000,000,000 tokens but its 0 shard(s) hold 0",
    ),
    "total of 4,000 digits": (
        lambda i: i.update(tokens=10**4000),
        "says a 4,001-digit number of tokens but its 6 shard(s) hold 184",
    ),
    "total off by one": (lambda i: i.update(tokens=185), "says 185 tokens but its 6 shard(s) hold 184"),
    "no tokens": (lambda i: i.update(shards=[], tokens=0), "the store holds no tokens"),
    "documents null": (lambda i: i.update(documents=None), "'documents' is None, not a whole number"),
    "dtype a long text": (lambda i: i.update(dtype="u" * 100_000), "'dtype' is 'uuuu"),
    "tokenizer a string": (lambda i: i.update(tokenizer="tiny"), "'tokenizer' is 'tiny', not a tokenizer's fingerprint"),
    "vocab_size text": (lambda i: i["tokenizer"].update(vocab_size="300"), "the tokenizer's 'vocab_size' is '300', not a number"),
    "vocab_size 0": (lambda i: i["tokenizer"].update(vocab_size=0), "the tokenizer's 'vocab_size' is 0, not a number"),
    "separator beyond vocab": (
        lambda i: i.update(separator=300),
        "'separator' is 300, not an id of its tokenizer's 300 tokens",
    ),
}


@pytest.mark.parametrize("case", sorted(SPOILED_INDEXES))
def test_an_index_value_of_the_wrong_kind_is_refused_naming_it(store, case):
    change, words = SPOILED_INDEXES[case]
    spoil_index(store, change)
    with pytest.raises(data.DataError) as e:
        data.Store(store)
    message = str(e.value)
    assert message.startswith(f"token store index {store / 'index.json'}") and words in message, message
    assert message.endswith(("; prepare the store again", "; prepare it from data that contains text")) and len(message) < 400


def test_verify_refuses_a_store_whose_index_claims_tokens_its_shards_do_not_hold(store):
    assert verify_command(store).returncode == 0
    spoil_index(store, lambda i: i.update(shards=[], tokens=10**20))
    done = verify_command(store)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: token store index {store / 'index.json'} says 100,000,000,000,000,000,000 tokens")


@pytest.mark.parametrize(
    ("write", "words"),
    [
        (lambda p: p.write_text(DEEP), "nests JSON too deeply to read; prepare the store again"),
        (lambda p: p.write_text("[1, 2]"), "is an array, not an object; prepare the store again"),
        (lambda p: p.write_bytes(b'{"format": "\xff"}'), "is not UTF-8 text"),
        (lambda p: os.mkfifo(p), "is not a regular file"),
        (lambda p: p.symlink_to("/dev/zero"), "is not a regular file"),
    ],
)
def test_an_index_that_is_not_a_small_json_object_is_one_line(store, write, words):
    (store / "index.json").unlink()
    write(store / "index.json")
    assert data.is_store(store)  # a store whose index is broken: refused as one, not read as a corpus
    with pytest.raises(data.DataError) as e:
        data.Store(store)
    assert str(e.value).startswith(f"token store index {store / 'index.json'} ") and words in str(e.value), str(e.value)


def test_a_shard_linked_to_a_device_is_not_called_missing(store):
    index = json.loads((store / "index.json").read_text())
    shard = store / index["shards"][1]["file"]
    shard.unlink()
    shard.symlink_to("/dev/zero")
    with pytest.raises(data.DataError) as e:
        data.Store(store)
    assert str(e.value) == (
        f"token store shard {shard} is not a regular file (a link to /dev/zero), its index says "
        f"{index['shards'][1]['tokens'] * 2} bytes; prepare the store again"
    )
    shard.unlink()
    with pytest.raises(data.DataError, match=f"token store shard {shard} is missing, its index says"):
        data.Store(store)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: p.write_text(DEEP), "nests JSON too deeply to read; pass another --out"),
        (lambda p: p.write_text("null"), "is null, not an object; pass another --out"),
        (
            lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "shards": [1]})),
            "shards[0] is a number, not an object",
        ),
        (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "offset": "0"})), "'offset' is '0', not a whole number"),
    ],
)
def test_a_bad_progress_file_is_one_line(tmp_path, tiny_tok, change, words):
    corpus = lines(tmp_path / "c.jsonl", *({"text": f"document {i} of a few words"} for i in range(8)))
    out = tmp_path / "s"
    data.prepare(str(corpus), out, tiny_tok, shard_tokens=32, workers=1, progress=False)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").unlink()  # as if killed before the index: the progress file of a finished run
    progress = {k: v for k, v in index.items() if k not in ("exhausted", "seconds")}
    del progress["tokenizer"]["vocab_size"]  # the index's alone: a progress file keeps what prepare was asked for
    (out / "progress.json").write_text(json.dumps({**progress, "offset": 0}))
    change(out / "progress.json")
    with pytest.raises(data.DataError) as e:
        data.prepare(str(corpus), out, tiny_tok, shard_tokens=32, workers=1, progress=False)
    assert words in str(e.value) and f"remove {out}, or pass --restart" in str(e.value), str(e.value)


def test_a_corpus_of_empty_documents_is_refused_not_stored_as_separators(tmp_path):
    corpus = lines(tmp_path / "c.jsonl", {"text": ""}, {"text": ""}, {"text": ""})
    out = tmp_path / "s"
    command = [sys.executable, "-m", "smollm_ref.data", "prepare", str(corpus), "--out", str(out), "--no-progress"]
    command += ["--tokenizer", str(FORMAT1 / "step_000002"), "--workers", "1"]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.returncode == 2 and not (out / "index.json").exists()
    assert done.stderr.strip() == (
        f"error: {corpus} holds no text to train on (no tokens after tokenising, or only the separators of empty "
        "documents); pass data that contains text"
    )


# the same kinds, elsewhere: a number too long to convert, a line that is not an object, long values quoted


def test_a_number_too_long_to_read_names_the_file_and_the_line(tmp_path, smollm_tok):
    corpus = lines(tmp_path / "c.jsonl", {"text": "fine"}, b'{"text": "x", "id": ' + b"7" * 5000 + b"}")
    with pytest.raises(data.DataError, match=rf"^{corpus} line 2 holds a number too long to read; fix the line$"):
        data.read_documents(str(corpus))
    chats = lines(tmp_path / "chat.jsonl", CHAT, b"[" + b"7" * 5000 + b"]")
    with pytest.raises(data.DataError, match=rf"^{chats} line 2 holds a number too long to read"):
        encode_records(str(chats), smollm_tok)


def test_a_text_line_that_is_not_an_object_names_its_kind(tmp_path):
    corpus = lines(tmp_path / "c.jsonl", {"text": "fine"}, ["fine"])
    with pytest.raises(data.DataError) as e:
        data.read_documents(str(corpus))
    assert str(e.value) == f"{corpus} line 2 is an array, not an object with a 'text' field; fix the line"


def test_a_non_utf8_chat_line_names_the_file_and_the_line(tmp_path, smollm_tok):
    chats = lines(tmp_path / "chat.jsonl", CHAT, b'{"messages": "\xff"}')
    with pytest.raises(data.DataError, match=rf"^{chats} line 2 is not UTF-8 \(byte 0xff at column 15\)"):
        encode_records(str(chats), smollm_tok)


def test_long_values_quoted_in_errors_are_cut(tmp_path, smollm_tok):
    chats = lines(tmp_path / "chat.jsonl", {"messages": [{"role": "u" * 100_000, "content": "hi"}]})
    with pytest.raises(data.DataError) as e:
        encode_records(str(chats), smollm_tok)
    assert "unknown role 'uuuu" in str(e.value) and len(str(e.value)) < 300
    keys = lines(tmp_path / "keys.jsonl", {f"key{i}": i for i in range(10_000)})
    with pytest.raises(data.DataError, match="has no 'messages'") as e:
        encode_records(str(keys), smollm_tok)
    assert len(str(e.value)) < 300


def test_tool_calls_are_refused_naming_the_record_and_a_table_s_null_ones_are_not(tmp_path, smollm_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "name": "f"}]}
    chats = lines(tmp_path / "chat.jsonl", CHAT, {"messages": [CHAT["messages"][0], call]})
    with pytest.raises(data.DataError) as e:
        encode_records(str(chats), smollm_tok)
    assert str(e.value).startswith(f"{chats} line 2: messages[1] holds 'tool_calls', which the chat template does not render")
    (tmp_path / "table").mkdir()
    rows = [CHAT, {"messages": [CHAT["messages"][0], call]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "table" / "train.parquet")
    assert data.iter_records(f"hf:{tmp_path / 'table'}").__next__()["messages"][1]["tool_calls"] is None  # filled in
    with pytest.raises(data.DataError, match=r"^dataset hf:.*table@train record 2: messages\[1\] holds 'tool_calls'"):
        encode_records(f"hf:{tmp_path / 'table'}", smollm_tok)
    no_calls = {"messages": [CHAT["messages"][0], {**call, "content": "yo", "tool_calls": []}]}
    pq.write_table(pa.Table.from_pylist([CHAT, no_calls]), tmp_path / "table" / "train.parquet")
    encoded, skipped = encode_records(f"hf:{tmp_path / 'table'}", smollm_tok)  # a null and an empty list: no call
    assert len(encoded) == 2 and skipped == 0 and encoded[0] == encoded[1]


def test_jsonl_files_in_a_directory_or_a_glob_give_their_text_fields_not_their_json(tmp_path):
    (tmp_path / "d").mkdir()
    lines(tmp_path / "d" / "part-0.jsonl", {"text": "one"}, {"text": "two"})
    lines(tmp_path / "d" / "part-1.ndjson", {"text": "three"})
    (tmp_path / "d" / "notes.txt").write_text("plain\n")
    assert data.read_documents(str(tmp_path / "d")) == ["plain\n", "one", "two", "three"]  # sorted by name
    assert data.read_documents(str(tmp_path / "d" / "part-*")) == ["one", "two", "three"]
    assert data.read_documents(str(tmp_path / "d" / "part-1.ndjson")) == ["three"]
    lines(tmp_path / "d" / "part-2.jsonl", {"text": None})
    with pytest.raises(data.DataError, match=rf"^{tmp_path / 'd' / 'part-2.jsonl'} line 1: field 'text' is null"):
        data.read_documents(str(tmp_path / "d"))


# token ids the model cannot embed (issue 18 item 4): refused by verify and by the trainer, before any write


def forge_ids(store: Path, *, keep_vocab: bool) -> None:
    """Every shard rewritten as 0xffff tokens with checksums that match: only the ids give it away.
    `keep_vocab` False: an index as older smollm_refs wrote it, without the tokenizer's vocabulary size."""
    import hashlib

    def change(index):
        for shard in index["shards"]:
            path = store / shard["file"]
            path.write_bytes(b"\xff" * path.stat().st_size)
            shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        if not keep_vocab:
            del index["tokenizer"]["vocab_size"]

    spoil_index(store, change)


def test_verify_refuses_token_ids_the_store_s_tokenizer_cannot_produce(store, tiny_tok):
    index = json.loads((store / "index.json").read_text())
    assert index["tokenizer"]["vocab_size"] == len(tiny_tok) == 300
    assert data.Store(store).verify() == max(np.asarray(data.Store(store).tokens()).tolist())
    forge_ids(store, keep_vocab=True)
    done = verify_command(store)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (
        f"error: token store shard {store / index['shards'][0]['file']} holds token id 65,535, but its tokenizer has "
        "300 tokens (ids 0 to 299); prepare the store again"
    )


@pytest.mark.parametrize("keep_vocab", [True, False], ids=["index-with-vocab", "older-index"])
def test_the_trainer_refuses_a_store_of_ids_beyond_the_model_before_writing(store, tmp_path, capsys, keep_vocab):
    forge_ids(store, keep_vocab=keep_vocab)
    if not keep_vocab:
        assert data.Store(store).verify() == 65535  # nothing in the index to check the ids against
    opts = tiny_options(tmp_path, data=str(store))
    assert train.main(argv(opts)) == 2
    [line] = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("error")]
    if keep_vocab:
        assert (
            line.startswith(f"error: token store shard {store}/shard_")
            and "holds token id 65,535, but its tokenizer has 300" in line
        )
    else:
        assert line == (
            f"error: token store {store} holds token id 65,535, but the model's vocabulary has 320 tokens (ids 0 to 319); "
            "prepare the store again"
        )
    assert not (tmp_path / "run").exists()  # no metrics.jsonl, no train_config.json


# a corpus of only empty documents leaves nothing behind (issue 18 item 15)


def test_prepare_of_empty_documents_removes_what_it_wrote(tmp_path, tiny_tok):
    corpus = lines(tmp_path / "c.jsonl", {"text": ""}, {"text": ""})
    out = tmp_path / "new" / "s"
    with pytest.raises(data.DataError, match="holds no text to train on"):
        data.prepare(str(corpus), out, tiny_tok, workers=1, progress=False)
    assert not (tmp_path / "new").exists()  # the directories it created, with its lock, shard and progress
    out.mkdir(parents=True)
    with pytest.raises(data.DataError, match="holds no text to train on"):
        data.prepare(str(corpus), out, tiny_tok, workers=1, progress=False)
    assert [p.name for p in out.iterdir()] == [".lock"]  # a directory it did not create stays, emptied


def test_the_trainer_s_cache_keeps_nothing_of_empty_documents(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(tmp_path / "cache"))
    corpus = lines(tmp_path / "c.jsonl", {"text": ""}, {"text": ""})
    assert train.main(argv(tiny_options(tmp_path, data=str(corpus)))) == 2
    assert "holds no text to train on" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "cache" / "tokens").exists() and not (tmp_path / "run").exists()
