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


# ---- text fields: a string or a refusal, never a repr ------------------------------------------------------


@pytest.mark.parametrize(("value", "shown"), [(None, "null"), (3, "int"), (2.5, "float"), (["a"], "list"), ({"a": 1}, "dict")])
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
    with pytest.raises(data.DataError, match=r"record 1: field 'text' is int, not a string; .* set --text-field"):
        data.read_documents(f"hf:{tmp_path / 'numbers'}")
    assert data.read_documents(f"hf:{tmp_path / 'numbers'}", text_field="body") == ["one", "two"]


# ---- bad lines: one error naming the file and the line --------------------------------------------------------


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


# ---- the same through prepare and the trainer: exit 2, one line ------------------------------------------


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
