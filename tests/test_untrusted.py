"""Files from elsewhere (checkpoints, config.json, weights, tokenizers) and options from a person: each bad one
is refused with one line that says why, quickly, before anything large is read or allocated (issue #11)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from smollm_ref import checkpoint, storage
from smollm_ref.config import ModelConfig

from .conftest import tiny_config


def _payload(tmp: Path) -> None:
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"w" * 100)
    torch.save({"step": 1}, tmp / checkpoint.STATE)


def _rewrite_manifest(directory: Path, change) -> None:
    path = directory / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest["files"], manifest)
    path.write_text(json.dumps(manifest))


# item 3: a manifest names files inside its checkpoint, regular ones, of the recorded size


def _escape_dotdot(files, directory):
    files["../../victim"] = {"sha256": "0" * 64, "bytes": 0}


def _absolute_device(files, directory):
    files["/dev/zero"] = {"sha256": "0" * 64, "bytes": 0}


def _symlink_to_dev_zero(files, directory):
    (directory / "zeros").symlink_to("/dev/zero")
    files["zeros"] = {"sha256": "0" * 64}  # no size recorded: the link alone is refused


def _weights_replaced_by_symlink(files, directory):
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").symlink_to("/dev/zero")


def _fifo(files, directory):
    os.mkfifo(directory / "pipe")  # opening it for reading would wait for a writer forever
    files["pipe"] = {"sha256": "0" * 64}


def _size_mismatch(files, directory):
    files["model.safetensors"]["bytes"] = 10**12


class _BoundedSha256:
    """hashlib.sha256 for `storage.sha256_file` (what `checkpoint.verify` hashes with) that fails once fed
    more bytes than the checkpoint's regular files hold: reading /dev/zero (what the old code did, forever)
    fails the test instead of hanging it."""

    def __init__(self, limit: int):
        self.limit, self.fed = limit, 0

    def __call__(self, *args):
        outer, real = self, hashlib.sha256(*args)

        class Hash:
            def update(self, chunk):
                outer.fed += len(chunk)
                assert outer.fed <= outer.limit, "verify read past the checkpoint's files (an endless file?)"
                real.update(chunk)

            def hexdigest(self):
                return real.hexdigest()

        return Hash()


def _verify_unblocked(directory: Path):
    """`checkpoint.verify(directory)` in a thread; a FIFO it waits on is opened for writing and closed after
    30 s, which ends the wait (end of file): a blocking open fails the test instead of hanging it."""
    outcome, done = [], threading.Event()

    def run():
        try:
            checkpoint.verify(directory)
            outcome.append(None)
        except BaseException as e:  # handed to the test's thread
            outcome.append(e)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(30.0):
        for fifo in (p for p in directory.iterdir() if stat.S_ISFIFO(p.lstat().st_mode)):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        done.wait(30.0)
        pytest.fail(f"verify waited on a FIFO in {directory} instead of refusing it")
    if outcome[0] is not None:
        raise outcome[0]


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (_escape_dotdot, "not a file in the checkpoint"),
        (_absolute_device, "not a file in the checkpoint"),
        (_symlink_to_dev_zero, "symbolic link"),
        (_weights_replaced_by_symlink, "symbolic link"),
        (_fifo, "not a regular file"),
        (_size_mismatch, "manifest says 1000000000000"),
    ],
)
def test_manifest_cannot_point_outside_or_at_endless_files(tmp_path, spoil, reason, monkeypatch):
    checkpoint.write(tmp_path, 1, _payload)
    bad = checkpoint.write(tmp_path, 2, _payload)
    _rewrite_manifest(bad, lambda files, manifest: spoil(files, bad))
    held = sum(p.lstat().st_size for p in bad.iterdir() if stat.S_ISREG(p.lstat().st_mode))
    monkeypatch.setattr(storage, "hashlib", SimpleNamespace(sha256=_BoundedSha256(held)))
    with pytest.raises(checkpoint.CheckpointError, match=reason) as info:
        _verify_unblocked(bad)  # refused before reading: not hashed, not waited on
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="step_000002.*falling back"):
        assert checkpoint.find(tmp_path).name == "step_000001"  # --resume auto still finds the previous one


@pytest.mark.parametrize("files", [["config.json", "model.safetensors"], "config.json", 3])
def test_manifest_files_not_a_mapping_is_a_one_line_reason(tmp_path, files):
    bad = checkpoint.write(tmp_path, 1, _payload)
    _rewrite_manifest(bad, lambda _, manifest: manifest.update(files=files))
    with pytest.raises(checkpoint.CheckpointError, match="'files' is a .*not a mapping") as info:
        checkpoint.verify(bad)
    assert "\n" not in str(info.value)


def test_manifest_without_sizes_still_verifies(tmp_path):
    good = checkpoint.write(tmp_path, 1, _payload)
    _rewrite_manifest(good, lambda files, _: [entry.pop("bytes") for entry in files.values()])
    checkpoint.verify(good)


def test_reader_retries_once_when_the_checkpoint_is_pruned_under_it(tmp_path):
    older = checkpoint.write(tmp_path, 1, _payload)
    checkpoint.write(tmp_path, 2, _payload)
    loaded = []

    def load(directory):
        if not loaded:  # a trainer's keep_last removes it between verify and load, and writes a newer one
            checkpoint.write(tmp_path, 3, _payload, keep_last=1)
        loaded.append(directory.name)
        return torch.load(directory / checkpoint.STATE, weights_only=True)

    found, state = checkpoint.load_latest(tmp_path, load)
    assert found.name == "step_000003" and state == {"step": 1}
    assert loaded == ["step_000002", "step_000003"] and not older.exists()


def test_reader_gives_up_after_the_second_pruning(tmp_path):
    checkpoint.write(tmp_path, 1, _payload)

    def load(directory):
        raise FileNotFoundError(2, "No such file or directory", str(directory / checkpoint.STATE))

    with pytest.raises(checkpoint.CheckpointError, match="removed while it was being read"):
        checkpoint.load_latest(tmp_path, load)


# item 8: config values of the wrong type name the field


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("rope_theta", [1, 2], "rope_theta must be a finite number"),
        ("rms_norm_eps", "1e-5", "rms_norm_eps must be a finite number"),
        ("rope_theta", float("inf"), "rope_theta must be a finite number"),
        ("hidden_size", 64.0, "hidden_size must be an integer"),
        ("num_hidden_layers", True, "num_hidden_layers must be an integer"),
        ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false"),
        ("attention_bias", "false", "attention_bias must be true or false"),
        ("hidden_act", None, "hidden_act must be a string"),
        ("bos_token_id", "1", "bos_token_id must be an integer or null"),
        ("eos_token_id", [2, None], "eos_token_id must be an integer or a list"),
        ("head_dim", [16], "head_dim must be an integer or null"),
    ],
)
def test_config_values_of_the_wrong_type_name_the_field(key, value, expected):
    data = tiny_config().to_dict()
    data[key] = value
    with pytest.raises(ValueError, match=f"ModelConfig.{expected}") as info:
        ModelConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_integer_floats_in_config_json_are_read_as_floats():
    data = tiny_config().to_dict() | {"rope_theta": 10000, "rms_norm_eps": 1}
    config = ModelConfig.from_dict(data)
    assert type(config.rope_theta) is float and type(config.rms_norm_eps) is float
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config == ModelConfig.from_dict(config.to_dict())


# tiny model directories and the generate CLI


def tiny_tokenizer(directory: Path):
    """A word-level tokenizer of a dozen words (ids below tiny_config's vocab of 256), saved to `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>", "hi", "there", "the", "cat", "sat", "on", "a", "mat", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def tiny_model_dir(directory: Path, tokenizer: bool = True, **changes) -> Path:
    from smollm_ref.model import LlamaForCausalLM
    from smollm_ref.weights import save_pretrained

    torch.manual_seed(0)
    save_pretrained(LlamaForCausalLM(tiny_config(**changes)), directory)
    if tokenizer:
        tiny_tokenizer(directory)
    return directory


def run_generate(*args: str, memory_limit: int | None = None):
    """`python -m smollm_ref.generate ARGS` -> (returncode, stdout, stderr lines); optionally under an
    address-space limit, so that a large allocation fails instead of being made."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    proc = subprocess.run(
        [sys.executable, "-m", "smollm_ref.generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        preexec_fn=limit if memory_limit else None,
    )
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, proc.stdout, err


def assert_one_line_error(result, *expected: str):
    code, out, err = result
    assert code != 0 and out == "", (code, out)
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0] and all(e in err[0] for e in expected), err


# item 4: a config is checked against its weights and the free memory before the model is allocated


def test_config_that_does_not_describe_its_weights_is_refused_before_allocating(tmp_path, monkeypatch):
    from smollm_ref import weights
    from smollm_ref.model import LlamaForCausalLM

    directory = tiny_model_dir(tmp_path, tokenizer=False)
    (directory / "config.json").write_text(json.dumps(tiny_config(intermediate_size=128).to_dict()))
    built = []

    class Watched(LlamaForCausalLM):
        def __init__(self, config):
            built.append(torch.empty(()).device.type)  # "meta" while only the expected shapes are worked out
            super().__init__(config)

    monkeypatch.setattr(weights.tensors, "LlamaForCausalLM", Watched)
    shapes = r"tensor model.layers.0.mlp.down_proj.weight has shape \[64, 96\] in the weights, the config implies \[64, 128\]"
    with pytest.raises(weights.SourceError, match=shapes) as info:
        weights.from_pretrained(directory)
    assert built == ["meta"] and "\n" not in str(info.value)
    (directory / "config.json").write_text(json.dumps(tiny_config(num_hidden_layers=30).to_dict()))
    with pytest.raises(weights.SourceError, match="lack model.layers.2.*and .* more"):
        weights.from_pretrained(directory)  # 28 layers more than the weights hold: none allocated
    assert built == ["meta", "meta"]


def _tiny_gguf(path: Path, block_count: int) -> Path:
    """A float32 llama GGUF of 2 layers whose metadata claims `block_count` layers."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(block_count)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", rng.standard_normal((256, 16), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(16, np.float32))
    parts = {"attn_norm": (16,), "ffn_norm": (16,), "attn_q": (16, 16), "attn_k": (8, 16), "attn_v": (8, 16)}
    parts |= {"attn_output": (16, 16), "ffn_gate": (32, 16), "ffn_up": (32, 16), "ffn_down": (16, 32)}
    for layer in range(2):
        for part, shape in parts.items():
            writer.add_tensor(f"blk.{layer}.{part}.weight", rng.standard_normal(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_whose_metadata_does_not_describe_its_tensors_is_refused_before_dequantising(tmp_path):
    from smollm_ref.weights import SourceError, from_pretrained

    assert from_pretrained(_tiny_gguf(tmp_path / "ok.gguf", block_count=2)).config.num_hidden_layers == 2
    with pytest.raises(SourceError, match=r"lack model.layers.2.self_attn.q_proj.weight and 251 more"):
        from_pretrained(_tiny_gguf(tmp_path / "bad.gguf", block_count=30))


_100_GB = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=100, num_attention_heads=32, num_key_value_heads=8)
_100_GB["head_dim"] = None  # hidden_size // num_attention_heads


def test_small_config_of_a_huge_model_is_refused_with_its_size_under_a_memory_limit(tmp_path):
    directory = tiny_model_dir(tmp_path)
    huge = tiny_config(vocab_size=49152).to_dict() | _100_GB
    (directory / "config.json").write_text(json.dumps(huge))
    assert (directory / "config.json").stat().st_size < 1024
    result = run_generate("--model", str(directory), "--prompt", "hi", memory_limit=4 << 30)
    assert_one_line_error(result, "22.01B parameters", "88.1 GB", "available")


def test_from_pretrained_of_a_huge_config_under_a_memory_limit(tmp_path):
    import resource
    import subprocess
    import sys

    directory = tiny_model_dir(tmp_path, tokenizer=False)
    (directory / "config.json").write_text(json.dumps(tiny_config(vocab_size=49152).to_dict() | _100_GB))
    code = (
        "import sys\nfrom smollm_ref.weights import SourceError, from_pretrained\n"
        f"try:\n    from_pretrained({str(directory)!r})\nexcept SourceError as e:\n    sys.exit(str(e))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)),
    )
    assert proc.returncode == 1 and "88.1 GB in float32" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# item 8: damaged or hostile weights and tokenizers, impossible options: one line, exit != 0


def test_bad_safetensors_is_one_line(tmp_path):
    directory = tiny_model_dir(tmp_path)
    (directory / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    assert_one_line_error(run_generate("--model", str(directory), "--prompt", "hi"), "not a readable safetensors file")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_in_one_line(tmp_path):
    directory = tiny_model_dir(tmp_path)
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, directory / "pytorch_model.bin")
    result = run_generate("--model", str(directory), "--prompt", "hi")
    assert_one_line_error(result, "pytorch_model.bin", "pickled objects other than tensors")
    assert not marker.exists()


def test_corrupt_tokenizer_json_is_one_line_in_generate_and_demo(tmp_path, capsys):
    from smollm_ref.demo import main as demo_main

    directory = tiny_model_dir(tmp_path)
    (directory / "tokenizer.json").write_text("{garbage")
    assert_one_line_error(run_generate("--model", str(directory), "--prompt", "hi"), "tokenizer files", "cannot be read")
    assert demo_main(["--model", str(directory), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "tokenizer files" in err[0], err


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--temperature", "nan"], "temperature must be 0 (greedy) or a finite number >= 0.001, got nan"),
        (["--temperature", "1e-45"], "temperature must be 0 (greedy) or a finite number >= 0.001"),
        (["--temperature", "inf"], "temperature must be"),
        (["--top-p", "nan"], "top_p must be in (0, 1]"),
        (["--max-new-tokens", "-1"], "max_new_tokens"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
        (["--device", "nonsense"], "is not a device"),
    ],
)
def test_impossible_generate_options_are_one_line_before_loading(option, expected):
    # The model source does not exist: the options are refused before anything is loaded.
    assert_one_line_error(run_generate("--model", "no/such-model", "--prompt", "hi", *option), expected)


def test_sampling_rejects_non_finite_and_tiny_temperatures():
    from smollm_ref.generate import generate
    from smollm_ref.model import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_config()).eval()
    for temperature in (float("nan"), float("inf"), 1e-45):
        with pytest.raises(ValueError, match="temperature must be 0"):
            generate(model, torch.ones(1, 3, dtype=torch.long), 2, temperature=temperature)


# item 10: generate checks everything before it prints the prompt


def test_generate_prints_nothing_before_its_checks_pass(tmp_path):
    directory = tiny_model_dir(tmp_path)
    result = run_generate("--model", str(directory), "--prompt", "hi", "--max-new-tokens", "1000")
    assert_one_line_error(result, "exceeds the model's 512 positions")  # the old code wrote "hierror: ..."
    code, out, _ = run_generate("--model", str(directory), "--prompt", "the cat", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("the cat")


# item 8: the demo's settings refuse NaN, inf and out-of-range values on the page


@pytest.mark.parametrize(
    "controls, field",
    [
        ((float("nan"), 0.7, 50, 0.9), "max_new_tokens"),
        ((float("inf"), 0.7, 50, 0.9), "max_new_tokens"),
        ((12.5, 0.7, 50, 0.9), "max_new_tokens"),
        ((12, float("nan"), 50, 0.9), "temperature"),
        ((12, 1e-45, 50, 0.9), "temperature"),
        ((12, -1.0, 50, 0.9), "temperature"),
        ((12, 0.7, float("nan"), 0.9), "top_k"),
        ((12, 0.7, -3, 0.9), "top_k"),
        ((12, 0.7, 50, float("nan")), "top_p"),
        ((12, 0.7, 50, 2.0), "top_p"),
        ((12, "warm", 50, 0.9), "temperature"),
    ],
)
def test_demo_settings_from_the_page_are_refused_on_the_page(tmp_path, controls, field):
    from smollm_ref.demo import Demo
    from smollm_ref.model import LlamaForCausalLM

    demo = Demo(LlamaForCausalLM(tiny_config()).eval(), tiny_tokenizer(tmp_path), "tiny")
    ((prompt, status),) = demo.complete_from_page("the cat", *controls)  # one answer: nothing generated
    assert prompt == "the cat" and status.startswith("⚠️ Settings.") and field in status
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ((same, status),) = demo.chat_from_page("hi", history, *controls)
    assert same is history and field in status


def test_demo_settings_from_the_page_generate_when_valid(tmp_path):
    from smollm_ref.demo import Demo
    from smollm_ref.model import LlamaForCausalLM

    demo = Demo(LlamaForCausalLM(tiny_config()).eval(), tiny_tokenizer(tmp_path), "tiny")
    *_, (text, status) = demo.complete_from_page("the cat", 4.0, 0.0, 0, 1.0)
    assert text.startswith("the cat") and "tokens in" in status
