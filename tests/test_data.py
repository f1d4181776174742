"""Training data: document readers, the token cache, the validation split, windows and their order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smollm_ref import data
from smollm_ref.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_stdlib_corpus_mixes_code_in_smollm2_layout_with_prose():
    docs = data.read_documents("stdlib")
    code = [d for d in docs if d.startswith(("<repo_name>", "<filename>"))]
    prose = [d for d in docs if not d.startswith(("<repo_name>", "<filename>"))]
    assert len(code) > 100 and len(prose) > 50
    json_pkg = next(d for d in code if d.startswith("<repo_name>cpython/Lib/json<file_sep>"))
    assert "<file_sep>json/decoder.py\n" in json_pkg
    assert any(d.startswith("<filename>os.py\n") for d in code)
    assert not any("<file_sep>test/" in d or d.startswith("<filename>test_") for d in code)
    # shuffled together: prose is spread through the stream, not appended as a block at the end
    positions = [i for i, d in enumerate(docs) if d in set(prose)]
    assert positions[0] < len(docs) // 4 and positions[-1] > 3 * len(docs) // 4


def test_file_directory_glob_and_jsonl(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.py").write_text("x = 1\n")
    (tmp_path / "d" / "sub" / "b.txt").write_text("plain prose\n")
    (tmp_path / "d" / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    assert data.read_documents(str(tmp_path / "d")) == ["<filename>a.py\nx = 1\n", "plain prose\n"]
    assert data.read_documents(str(tmp_path / "d" / "sub" / "b.txt")) == ["plain prose\n"]
    assert data.read_documents(str(tmp_path / "d" / "**" / "*.txt")) == ["plain prose\n"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "two", "text": "three"}) + "\n")
    assert data.read_documents(str(jsonl)) == ["one", "three"]
    with pytest.raises(data.DataError, match="line 1 has no 'body' field"):
        data.read_documents(str(jsonl), text_field="body")


@pytest.mark.parametrize(
    ("spec", "message"),
    [("/no/such/path.txt", "does not exist"), ("/no/such/*.txt", "matches no files")],
)
def test_missing_data_is_a_clear_error(spec, message):
    with pytest.raises(data.DataError, match=message):
        data.read_documents(spec)


def test_hf_dataset_without_datasets_package_or_network_is_a_clear_error():
    with pytest.raises(data.DataError, match="HuggingFaceTB/no-such-dataset"):
        data.read_documents("hf:HuggingFaceTB/no-such-dataset")


def test_token_store_is_keyed_by_the_source_and_joins_documents_with_endoftext(tmp_path, tok):
    docs = ["def f():\n    return 1\n", "Some prose."]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    store = data.cached_store(str(corpus), tok, tmp_path / "cache", progress=False)
    tokens = np.asarray(store.tokens())
    expected = tok(docs[0], add_special_tokens=False).input_ids + [0] + tok(docs[1], add_special_tokens=False).input_ids + [0]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert data.separator_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>") == 0
    mtime = (store.dir / "index.json").stat().st_mtime_ns
    again = data.cached_store(str(corpus), tok, tmp_path / "cache", progress=False)
    assert again.dir == store.dir and (store.dir / "index.json").stat().st_mtime_ns == mtime  # opened, not re-made
    corpus.write_text(json.dumps({"text": docs[0]}) + "\n")  # the source changed: another store
    assert data.cached_store(str(corpus), tok, tmp_path / "cache", progress=False).dir != store.dir


def test_split_holds_out_the_tail_and_rejects_short_corpora():
    tokens = np.arange(1000, dtype=np.uint16)
    split = data.split_tokens(tokens, seq_len=16, val_fraction=0.1)
    assert len(split.val) == 100 and split.train[-1] + 1 == split.val[0]
    assert len(data.split_tokens(tokens, seq_len=16, val_fraction=0.0).val) == 0
    small = data.split_tokens(tokens[:30], seq_len=16, val_fraction=0.1)  # no room for both: all for training
    assert len(small.train) == 30 and len(small.val) == 0
    with pytest.raises(data.DataError, match="fewer than one sequence"):
        data.split_tokens(tokens[:16], seq_len=16, val_fraction=0.1)
    with pytest.raises(data.DataError, match="empty"):
        data.split_tokens(tokens[:0], seq_len=16, val_fraction=0.1)


def test_windows_targets_are_inputs_shifted_by_one():
    windows = data.Windows(np.arange(100, dtype=np.uint16), seq_len=8)
    assert len(windows) == 12
    x, y = windows.batch([0, 3])
    assert x.dtype == torch.int64 and x.shape == (2, 8)
    assert x[1].tolist() == list(range(24, 32)) and y[1].tolist() == list(range(25, 33))


def test_order_is_a_seeded_permutation_per_epoch():
    order = data.Order(10, seed=3)
    first, second = order.indices(0, 10), order.indices(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert data.Order(10, seed=3).indices(7, 6) == (first + second)[7:13]  # any position, any instance
    assert data.Order(10, seed=4).indices(0, 10) != first
