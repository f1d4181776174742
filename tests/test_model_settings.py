"""Issue 18 items 2 and 8 for model configs: every source of a model (config.json, GGUF metadata, a
checkpoint, a recipe's --model-config, a transformers model) refuses a setting the model does not compute,
in one line naming the key and its value; every value is of its type and finite range; and the small files
that describe a model (config.json, a checkpoint's manifest and run options) are read as small regular files,
so a FIFO never hangs and a device is never read without end."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from smollm_ref import checkpoint
from smollm_ref.config import ModelConfig
from smollm_ref.model import LlamaForCausalLM
from smollm_ref.storage import BadFile
from smollm_ref.weights import SourceError, from_pretrained, gguf_config, read_config, save_pretrained
from tests.conftest import tiny_config
from tests.trainer_runs import argv, tiny_options

# GGUF

# The metadata of a 2-layer llama GGUF (width 16, 2 heads of 8, 1 key/value head), as `gguf_metadata` reads it.
BASE = {
    "general.architecture": "llama",
    "llama.block_count": 2,
    "llama.context_length": 64,
    "llama.embedding_length": 16,
    "llama.feed_forward_length": 32,
    "llama.attention.head_count": 2,
    "llama.attention.head_count_kv": 1,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
}
PARTS = {"attn_norm": (16,), "ffn_norm": (16,), "attn_q": (16, 16), "attn_k": (8, 16), "attn_v": (8, 16)}
PARTS |= {"attn_output": (16, 16), "ffn_gate": (32, 16), "ffn_up": (32, 16), "ffn_down": (16, 32)}
SHAPES = {"token_embd.weight": (256, 16), "output_norm.weight": (16,)}
SHAPES |= {f"blk.{i}.{part}.weight": shape for i in range(2) for part, shape in PARTS.items()}


def _value_type(value):
    V = gguf.GGUFValueType
    if isinstance(value, bool):
        return V.BOOL
    if isinstance(value, int):
        return V.UINT32 if value >= 0 else V.INT32
    if isinstance(value, float):
        return V.FLOAT32
    if isinstance(value, str):
        return V.STRING
    raise TypeError(value)


def write_gguf(path: Path, metadata: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A float32 GGUF of BASE's model with `metadata` added to (or replacing) BASE's keys and `drop` removed."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in ({k: v for k, v in BASE.items() if k not in drop} | (metadata or {})).items():
        if key == "general.architecture":
            continue
        if isinstance(value, list):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, _value_type(value[0]))
        else:
            writer.add_key_value(key, value, _value_type(value))
    for name, shape in SHAPES.items():
        writer.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def config_of(metadata: dict, shapes: dict | None = None) -> ModelConfig:
    return gguf_config(BASE | metadata, shapes or SHAPES, "m.gguf")[0]


def test_the_issue_example_gguf_rope_scaling_linear_factor_4_is_refused(tmp_path):
    plain = write_gguf(tmp_path / "plain.gguf")
    config = from_pretrained(plain).config  # the same file without the two keys loads
    assert (config.hidden_size, config.head_dim, config.rope_theta, config.max_position_embeddings) == (16, 8, 1e4, 64)
    scaled = write_gguf(tmp_path / "scaled.gguf", {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(SourceError) as info:
        from_pretrained(scaled)
    message = str(info.value)
    assert "llama.rope.scaling.type = 'linear'" in message and "llama.rope.scaling.factor = 4.0" in message
    assert "RoPE scaling" in message and "\n" not in message


def test_the_issue_example_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    scaled = write_gguf(tmp_path / "scaled.gguf", {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    proc = subprocess.run(
        [sys.executable, "-m", "smollm_ref.generate", "--model", str(scaled), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()  # a "loading ..." progress line, then the error
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), lines
    assert "llama.rope.scaling.factor = 4.0" in lines[-1] and sum(line.startswith("error") for line in lines) == 1


def _gguf_llama_keys() -> list[str]:
    """Every per-architecture metadata key the gguf package knows (LLM, attention, RoPE), for llama."""
    keys = []
    for group in (gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope):
        for template in vars(group).values():
            if isinstance(template, str) and template.startswith("{arch}.") and template.count("{") == 1:
                keys.append(template.format(arch="llama"))
    return sorted(keys)


# What the model reads (sizes, theta, eps, head size) or what describes a RoPE scaling only when there is one.
READ = {f"llama.{k}" for k in ("vocab_size", "context_length", "embedding_length", "block_count", "feed_forward_length")}
READ |= {
    f"llama.attention.{k}"
    for k in ("head_count", "head_count_kv", "key_length", "value_length", "layer_norm_rms_epsilon", "scale")
}
READ |= {"llama.rope.freq_base", "llama.rope.dimension_count", "llama.tensor_data_layout"}
ACCEPTED_AS_NOTES = {"llama.rope.scaling.original_context_length": 3, "llama.rope.scaling.finetuned": True}


@pytest.mark.parametrize("key", [k for k in _gguf_llama_keys() if k not in READ and k not in ACCEPTED_AS_NOTES])
def test_every_other_gguf_llama_key_with_a_non_neutral_value_is_refused_naming_it(key):
    with pytest.raises(SourceError, match=f"{key.replace('.', '[.]')} = 3") as info:
        config_of({key: 3})
    assert "\n" not in str(info.value)


def test_the_keys_the_reader_knows_are_gguf_keys():
    from smollm_ref.weights.gguf import _GGUF_NEUTRAL, _GGUF_READ

    known = set(_gguf_llama_keys())
    assert {f"llama.{k}" for k in _GGUF_READ | set(_GGUF_NEUTRAL)} <= known
    assert READ | set(ACCEPTED_AS_NOTES) <= known


@pytest.mark.parametrize(
    "key, value",
    [
        ("llama.expert_count", 0),
        ("llama.expert_used_count", 0),
        ("llama.attention.causal", True),
        ("llama.use_parallel_residual", False),
        ("llama.attention.sliding_window", 0),
        ("llama.attention.clamp_kqv", 0.0),
        ("llama.attention.max_alibi_bias", 0.0),
        ("llama.attn_logit_softcapping", 0.0),
        ("llama.final_logit_softcapping", 0.0),
        ("llama.logit_scale", 1.0),
        ("llama.embedding_scale", 0.0),
        ("llama.residual_scale", 1.0),
        ("llama.pooling_type", 0),
        ("llama.rope.scaling.type", "none"),
        ("llama.rope.scaling.type", "linear"),  # llama.cpp: linear without a factor is plain RoPE
        ("llama.rope.scaling.factor", 1.0),
        ("llama.rope.scaling.attn_factor", 1.0),
        ("llama.rope.dimension_count", 8),
        ("llama.attention.key_length", 8),
        ("llama.attention.value_length", 8),
        ("llama.attention.scale", 8**-0.5),
        ("llama.vocab_size", 256),
        ("general.name", "a name"),
        ("general.file_type", 0),
        ("quantize.imatrix.file", "imatrix.dat"),
        ("split.count", 1),
        *ACCEPTED_AS_NOTES.items(),
    ],
)
def test_neutral_and_descriptive_gguf_keys_are_accepted(key, value):
    assert config_of({key: value}) == config_of({})


@pytest.mark.parametrize(
    "metadata, shapes, expected",
    [
        ({"llama.rope.scaling.factor": 4.0}, None, "llama.rope.scaling.factor = 4.0 asks for RoPE scaling"),
        ({"llama.rope.scaling.type": "yarn"}, None, "llama.rope.scaling.type = 'yarn' asks for RoPE scaling"),
        ({"llama.rope.dimension_count": 4}, None, "llama.rope.dimension_count = 4 differs from the head size 8: partial RoPE"),
        ({"llama.attention.key_length": 16, "llama.attention.value_length": 8}, None, "llama.attention.value_length = 8"),
        ({"llama.attention.layer_norm_epsilon": 1e-5}, None, "llama.attention.layer_norm_epsilon = 1e-05 describes LayerNorm"),
        ({"llama.attention.scale": 0.5}, None, "llama.attention.scale = 0.5"),
        ({"llama.vocab_size": 300}, None, "llama.vocab_size = 300 but token_embd.weight is 256 x 16"),
        ({"llama.embedding_length": 32}, None, "llama.embedding_length = 32"),
        ({"llama.feed_forward_length": [32, 64]}, None, "llama.feed_forward_length = [32, 64] varies by layer"),
        ({"llama.attention.head_count_kv": [1, 2]}, None, "llama.attention.head_count_kv = [1, 2] varies by layer"),
        ({"split.count": 3}, None, "split into 3 files"),
        ({"general.type": "adapter"}, None, "GGUF 'adapter' file, not a model"),
        ({"adapter.type": "lora"}, None, "adapter.type = 'lora' is not one this llama model reads"),
        ({"mystery.key": 1}, None, "mystery.key = 1"),
        ({}, SHAPES | {"rope_freqs.weight": (4,)}, "rope_freqs.weight (per-frequency RoPE factors"),
        ({}, SHAPES | {"blk.0.attn_q_norm.weight": (8,)}, "blk.0.attn_q_norm.weight has no place"),
    ],
)
def test_gguf_settings_the_model_does_not_compute_are_refused(metadata, shapes, expected):
    with pytest.raises(SourceError) as info:
        config_of(metadata, shapes)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_gguf_head_size_and_biases_are_read_not_assumed():
    wide = config_of({"llama.attention.key_length": 16, "llama.attention.value_length": 16, "llama.rope.dimension_count": 16})
    assert wide.head_dim == 16
    biased = SHAPES | {f"blk.{i}.{p}.bias": (n,) for i in range(2) for p, n in (("attn_q", 16), ("attn_k", 8))}
    assert config_of({}, biased).attention_bias and not config_of({}).attention_bias


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("llama.rope.freq_base", math.inf, "llama.rope.freq_base = inf: ModelConfig.rope_theta must be a finite number"),
        ("llama.rope.freq_base", math.nan, "llama.rope.freq_base = nan"),
        ("llama.rope.freq_base", -1.0, "llama.rope.freq_base = -1.0: ModelConfig.rope_theta must be >= 1"),
        ("llama.rope.freq_base", "big", "llama.rope.freq_base = 'big'"),
        ("llama.attention.layer_norm_rms_epsilon", math.nan, "llama.attention.layer_norm_rms_epsilon = nan"),
        ("llama.attention.layer_norm_rms_epsilon", 0.0, "llama.attention.layer_norm_rms_epsilon = 0.0"),
        ("llama.context_length", 64.0, "llama.context_length = 64.0: ModelConfig.max_position_embeddings must be an integer"),
        ("llama.block_count", True, "llama.block_count = True"),
        ("llama.attention.head_count_kv", 3, "llama.attention.head_count_kv = 3"),
        ("tokenizer.ggml.eos_token_id", 999, "tokenizer.ggml.eos_token_id = 999"),
    ],
)
def test_gguf_values_of_the_wrong_type_or_range_name_their_key(key, value, expected):
    with pytest.raises(SourceError) as info:
        config_of({key: value})
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["llama.block_count", "llama.attention.layer_norm_rms_epsilon", "llama.context_length"])
def test_gguf_without_a_required_key_names_it(tmp_path, key):
    with pytest.raises(SourceError, match=f"lacks the GGUF key {key}"):
        from_pretrained(write_gguf(tmp_path / "m.gguf", drop=(key,)))


# config.json, wherever it comes from


REFUSED_CONFIG = [
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "rope_scaling type 'linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters type 'yarn'"),
    ({"rope_parameters": {"rope_type": "default", "factor": 4.0}}, "rope_parameters.factor=4.0"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_theta": 1e4}, "differs from rope_theta"),
    ({"rope_scaling": "linear"}, "rope_scaling must be an object or null, got 'linear'"),
    ({"sliding_window": 4096}, "sliding_window=4096"),
    ({"use_sliding_window": True}, "use_sliding_window=True"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ({"num_local_experts": 8}, "num_local_experts=8"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types=['sliding_attention'"),
    ({"pretraining_tp": 2}, "pretraining_tp=2"),
    ({"rope_interleaved": True}, "rope_interleaved=True"),
    ({"model_type": "mistral"}, "model_type must be 'llama'"),
    ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
    ({"embedding_multiplier": 12.0}, "embedding_multiplier=12.0"),
    ({"qk_norm_eps": 1e-6}, "unknown key(s) ['qk_norm_eps']"),
]


@pytest.mark.parametrize("extra, expected", REFUSED_CONFIG)
def test_config_json_settings_the_model_does_not_compute_are_refused(tmp_path, extra, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config().to_dict() | extra))
    with pytest.raises(ValueError) as info:
        ModelConfig.from_json(path)
    assert expected in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "extra",
    [
        {"sliding_window": None, "use_sliding_window": False, "attn_logit_softcapping": None},
        {"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}, "rope_theta": 100000},
        {"layer_types": ["full_attention", "full_attention"], "partial_rotary_factor": 1.0, "pretraining_tp": 1},
        {"num_local_experts": None, "_name_or_path": "x", "torch_dtype": "bfloat16", "use_cache": False},
    ],
)
def test_neutral_config_json_settings_are_accepted(extra):
    assert ModelConfig.from_dict(tiny_config().to_dict() | extra) == tiny_config()


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"rope_theta": math.inf}, "rope_theta must be a finite number, got inf"),
        ({"rope_theta": -1.0}, "rope_theta must be >= 1"),
        ({"rope_theta": 0.5}, "rope_theta must be >= 1"),
        ({"rms_norm_eps": math.nan}, "rms_norm_eps must be a finite number, got nan"),
        ({"rms_norm_eps": 1e-50}, "rms_norm_eps must be > 0 and within float32's range"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a finite number, got '1e-5' (str)"),
        ({"initializer_range": 1e39}, "initializer_range must be > 0 and within float32's range"),
        ({"hidden_size": 2**40}, "hidden_size must be an integer in [1, 2147483647]"),
        ({"vocab_size": "256"}, "vocab_size must be an integer, got '256' (str)"),
        ({"attention_bias": "false"}, "attention_bias must be true or false"),
        ({"attention_dropout": math.inf}, "attention_dropout must be a finite number"),
    ],
)
def test_config_json_values_are_checked_for_type_and_finite_range(tmp_path, extra, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config().to_dict() | extra))  # json writes Infinity and NaN, and reads them
    with pytest.raises(ValueError) as info:
        ModelConfig.from_json(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("document", ["[1, 2]", "null", "3"])
def test_config_json_that_is_not_an_object_is_one_line(tmp_path, document):
    (tmp_path / "config.json").write_text(document)
    with pytest.raises(ValueError, match="must be a JSON object"):
        ModelConfig.from_json(tmp_path / "config.json")


def _model_dir(directory: Path, **extra) -> Path:
    save_pretrained(LlamaForCausalLM(tiny_config()), directory)
    config = json.loads((directory / "config.json").read_text()) | extra
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_transformers_directory_asking_for_rope_scaling_is_refused(tmp_path):
    directory = _model_dir(tmp_path / "m", rope_scaling={"rope_type": "linear", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_scaling type 'linear' is not supported"):
        from_pretrained(directory)


def test_a_checkpoint_asking_for_rope_scaling_is_refused(tmp_path):
    def payload(tmp: Path) -> None:
        _model_dir(tmp, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
        torch.save({"step": 1}, tmp / checkpoint.STATE)

    checkpoint.write(tmp_path / "run" / "checkpoints", 1, payload)  # the manifest matches: only the setting is wrong
    with pytest.raises(ValueError, match="rope_parameters type 'linear' is not supported"):
        from_pretrained(tmp_path / "run")


def test_a_transformers_model_asking_for_rope_scaling_is_refused():
    from smollm_ref import from_transformers

    hf_config = transformers.LlamaConfig(**tiny_config().to_dict() | {"rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    with pytest.raises(ValueError, match="rope_parameters type 'linear'"):
        from_transformers(transformers.LlamaForCausalLM(hf_config))


def test_a_recipe_model_config_asking_for_a_sliding_window_is_refused_before_training(tmp_path):
    config = tmp_path / "model.json"
    config.write_text(json.dumps(json.loads(Path(tiny_options(tmp_path)["model_config"]).read_text()) | {"sliding_window": 16}))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model_config": str(config)}))
    opts = tiny_options(tmp_path)
    del opts["model_config"]
    proc = subprocess.run(
        [sys.executable, "-m", "smollm_ref.train", "--recipe", str(recipe), *argv(opts)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "sliding_window=16 is not supported" in lines[0] and str(config) in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()


# item 8: the files that describe a model are small regular files


_WRITER = """
import os, sys, time
while True:
    try:
        os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while no reader is waiting
    except OSError:
        pass
    time.sleep(0.05)
"""


@contextlib.contextmanager
def writer_comes_and_goes(fifo: Path):
    """Should the code under test open `fifo` for reading (the fault these tests guard), a writer opens and
    closes it, so that the read ends (empty) and the test fails on the reader's result instead of hanging.
    The writer is another process: a reader blocked in a native open (safetensors) holds the GIL. The fixed
    code never opens the FIFO for reading, so the writer never gets in: the outcome is the same however fast
    the machine."""
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(fifo)])
    try:
        yield
    finally:
        writer.kill()
        writer.wait()


def test_a_fifo_as_config_json_is_refused_without_hanging(tmp_path):
    directory = _model_dir(tmp_path / "m")
    (directory / "config.json").unlink()
    os.mkfifo(directory / "config.json")
    with writer_comes_and_goes(directory / "config.json"):
        for read in (ModelConfig.from_json, read_config, from_pretrained):
            with pytest.raises(BadFile, match="config.json is not a regular file") as info:
                read(directory / "config.json" if read == ModelConfig.from_json else directory)
            assert "\n" not in str(info.value)


def test_dev_zero_and_oversized_config_json_are_refused_without_reading_them(tmp_path):
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "config.json").symlink_to("/dev/zero")
    with pytest.raises(BadFile, match="not a regular file"):
        read_config(tmp_path / "zero")
    big = tmp_path / "big.json"
    big.write_text(json.dumps(tiny_config().to_dict()) + " " * (17 << 20))  # valid JSON, 17 MB of it spaces
    with pytest.raises(BadFile, match="more than the 16,777,216 bytes"):
        ModelConfig.from_json(big)


@pytest.mark.parametrize("name", ["model.safetensors", "m.gguf"])
def test_a_fifo_as_a_weights_file_is_refused_without_hanging(tmp_path, name):
    directory = _model_dir(tmp_path / "m")
    if name.endswith(".gguf"):
        for path in directory.iterdir():
            path.unlink()  # a directory of one .gguf
    else:
        (directory / name).unlink()
    os.mkfifo(directory / name)
    with writer_comes_and_goes(directory / name), pytest.raises(SourceError, match=f"{name} is not a regular file"):
        from_pretrained(directory)


def _payload(tmp: Path) -> None:
    save_pretrained(LlamaForCausalLM(tiny_config()), tmp)
    torch.save({"step": 2, "optimizer": {"state": {}}}, tmp / checkpoint.STATE)
    (tmp / checkpoint.TRAIN_CONFIG).write_text(json.dumps({"lr": 0.001}))


def test_a_fifo_as_the_run_options_of_a_checkpoint_is_refused_without_hanging(tmp_path):
    found = checkpoint.write(tmp_path, 2, _payload)
    assert checkpoint.load_train_config(found) == {"lr": 0.001}
    manifest = json.loads((found / checkpoint.MANIFEST).read_text())
    del manifest["files"][checkpoint.TRAIN_CONFIG]  # a hand-made manifest need not list it: it is read anyway
    (found / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    (found / checkpoint.TRAIN_CONFIG).unlink()
    os.mkfifo(found / checkpoint.TRAIN_CONFIG)
    checkpoint.verify(found)
    with writer_comes_and_goes(found / checkpoint.TRAIN_CONFIG):
        with pytest.raises(checkpoint.CheckpointError, match="train_config.json: run options .* is not a regular file"):
            checkpoint.load_train_config(found)
    (found / checkpoint.TRAIN_CONFIG).unlink()
    (found / checkpoint.TRAIN_CONFIG).write_text("[1]")
    with pytest.raises(checkpoint.CheckpointError, match="train_config.json is a JSON list, not an object"):
        checkpoint.load_train_config(found)


def test_a_fifo_as_a_manifest_is_refused_and_never_waited_on(tmp_path, capsys):
    from smollm_ref.train.checkpointer import drop_optimizer_state

    found = checkpoint.write(tmp_path, 2, _payload)
    state = (found / checkpoint.STATE).read_bytes()
    (found / checkpoint.MANIFEST).unlink()
    os.mkfifo(found / checkpoint.MANIFEST)
    with writer_comes_and_goes(found / checkpoint.MANIFEST):
        with pytest.raises(checkpoint.CheckpointError, match="manifest.json is not a regular file"):
            checkpoint.verify(found)
        drop_optimizer_state(found)  # an older checkpoint slimmed after a save: a warning, the run goes on
    assert "manifest.json is not a regular file" in capsys.readouterr().err
    assert (found / checkpoint.STATE).read_bytes() == state  # left as it was


def test_an_oversized_manifest_is_refused_without_reading_it(tmp_path):
    found = checkpoint.write(tmp_path, 2, _payload)
    manifest = (found / checkpoint.MANIFEST).read_text()
    (found / checkpoint.MANIFEST).write_text(manifest + " " * (17 << 20))  # still valid JSON
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json: manifest .* more than the 16,777,216 bytes"):
        checkpoint.verify(found)
    (found / checkpoint.MANIFEST).write_text("[]")
    with pytest.raises(checkpoint.CheckpointError, match="manifest.json is a JSON list, not an object"):
        checkpoint.verify(found)


@pytest.mark.parametrize("name", ["", 3, None])
def test_a_model_config_name_that_is_not_one_is_a_value_error(name):
    for read in (ModelConfig.from_name, read_config):
        with pytest.raises(ValueError, match="preset name or a path"):
            read(name)


def test_a_gguf_value_derived_from_others_names_no_key_it_does_not_have():
    with pytest.raises(SourceError) as info:
        config_of({"llama.attention.head_count": 16, "llama.attention.head_count_kv": 16})  # head size 16 / 16 = 1: odd
    assert "head_dim must be even" in str(info.value) and "key_length" not in str(info.value)


def test_the_settings_accepted_rather_than_refused_compute_what_transformers_computes():
    """attention_bias, mlp_bias and a head size other than hidden/heads are accepted because the model
    implements them: the same weights give transformers' logits bit for bit (float32, CPU)."""
    from smollm_ref import to_transformers

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(attention_bias=True, mlp_bias=True, head_dim=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases start at zero: make them count
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, to_transformers(model).eval()(ids).logits)
