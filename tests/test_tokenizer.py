"""SmolLM2's tokenizer from the embedded GGUF, its cache, and the GPT-2 alternative."""

import json

import pytest

from smollm_ref.model import LlamaForCausalLM
from smollm_ref.tokenizer import SMOLLM2_SPECIAL_TOKENS, load_gpt2_tokenizer, load_tokenizer
from smollm_ref.weights import SourceError
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_smollm2_vocabulary_and_special_tokens(tok):
    assert len(tok) == 49152
    assert tok.convert_tokens_to_ids(SMOLLM2_SPECIAL_TOKENS) == list(range(17))
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    for name in ("<repo_name>", "<file_sep>", "<jupyter_text>", "<filename>"):
        assert tok(name, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(name)]


def test_round_trip_and_chat_template(tok):
    text = "def add(a, b):\n    return a + b  # naïve ✓"
    assert tok.decode(tok(text).input_ids) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_second_load_comes_from_the_tokenizer_json_cache(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(tmp_path))
    first = load_tokenizer()
    cached = list(tmp_path.glob("tokenizers/*/tokenizer.json"))
    assert len(cached) == 1
    second = load_tokenizer()
    assert first("hello world").input_ids == second("hello world").input_ids == tok("hello world").input_ids


def test_tokenizer_from_a_saved_model_directory(tok, tmp_path):
    from smollm_ref.weights import save_pretrained

    save_pretrained(LlamaForCausalLM(tiny_config()), tmp_path, tokenizer=tok)
    assert load_tokenizer(tmp_path)("x = 1").input_ids == tok("x = 1").input_ids


def test_directory_without_tokenizer_is_a_clear_error(tmp_path):
    from smollm_ref.weights import save_pretrained

    save_pretrained(LlamaForCausalLM(tiny_config()), tmp_path)
    with pytest.raises(SourceError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_gpt2_alternative_adds_special_tokens_and_the_model_follows(tmp_path):
    """GPT-2's tokenizer files are not reachable here, so a small byte-level BPE in GPT-2's file format
    stands in: the special tokens are appended after its vocabulary and the model is resized to match."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello world, the quick brown fox"] * 20, vocab_size=300, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    tok = load_gpt2_tokenizer(tmp_path)
    assert all(t in tok.get_vocab() for t in SMOLLM2_SPECIAL_TOKENS)
    assert tok.eos_token == "<|endoftext|>"
    model = LlamaForCausalLM(tiny_config())
    model.resize_token_embeddings(len(tok))
    ids = tok("hello <file_sep> world", return_tensors="pt").input_ids
    assert tok.convert_tokens_to_ids("<file_sep>") in ids[0].tolist()
    assert model(ids).logits.shape[-1] == len(tok) == model.config.vocab_size
