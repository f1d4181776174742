import json

import pytest
import torch
import transformers

from smollm_ref import configs
from smollm_ref.config import ModelConfig, preset_names
from tests.conftest import tiny_config


def hf_param_count(config: ModelConfig) -> int:
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_dict())).num_parameters()


def test_smollm2_135m_matches_the_published_shape_and_count():
    c = ModelConfig.from_name("smollm2-135m")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.rope_theta, c.rms_norm_eps) == (1536, 49152, 100000.0, 1e-5)
    assert c.max_position_embeddings == 8192 and c.tie_word_embeddings and c.head_dim == 64
    assert c.num_parameters() == 134_515_008
    assert hf_param_count(c) == 134_515_008


@pytest.mark.parametrize("name", ["smollm2-360m", "smollm2-1.7b", "smollm2-tiny"])
def test_presets_count_like_transformers(name):
    c = ModelConfig.from_name(name)
    assert c.num_parameters() == hf_param_count(c)


def test_untied_count_like_transformers():
    c = tiny_config(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    assert c.num_parameters() == hf_param_count(c)


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-360m", "smollm2-1.7b", "smollm2-tiny"])
def test_presets_are_valid_transformers_configs(name, tmp_path):
    ours = ModelConfig.from_name(name)
    (tmp_path / "config.json").write_text(json.dumps(ours.to_dict()))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert theirs.model_type == "llama"
    assert theirs.hidden_size == ours.hidden_size and theirs.num_key_value_heads == ours.num_key_value_heads
    assert theirs.rope_parameters["rope_theta"] == ours.rope_theta and theirs.rms_norm_eps == ours.rms_norm_eps
    assert ModelConfig.from_dict(theirs.to_diff_dict()) == ours


def test_json_round_trip(tmp_path):
    c = tiny_config(tie_word_embeddings=False, pad_token_id=3)
    c.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == c
    assert ModelConfig.from_name(tmp_path / "c.json") == c


def test_reads_smollm2_hub_style_config():
    # The shape of SmolLM2's own config.json on the Hub: flat rope_theta, nanotron keys, rope_scaling null.
    data = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": 576,
        "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536,
        "is_llama_config": True,
        "max_position_embeddings": 8192,
        "model_type": "llama",
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "num_key_value_heads": 3,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_interleaved": False,
        "rope_scaling": None,
        "rope_theta": 100000,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "vocab_size": 49152,
    }
    c = ModelConfig.from_dict(data)
    assert c.rope_theta == 100000.0 and c.num_parameters() == 134_515_008


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(hidden_size=65), "num_attention_heads"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(head_dim=15), "head_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(eos_token_id=999), "eos_token_id"),
        (dict(pad_token_id=256), "pad_token_id"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
    ],
)
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**changes)


def test_unknown_key_is_an_error():
    data = tiny_config().to_dict() | {"hiden_size": 64}
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
        ({"model_type": "mistral"}, "model_type"),
        ({"rope_interleaved": True}, "rope_interleaved"),
        ({"pretraining_tp": 2}, "pretraining_tp"),
    ],
)
def test_unsupported_features_are_errors(extra, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(tiny_config().to_dict() | extra)


def test_vocab_smaller_than_tokenizer_is_an_error():
    tiny_config().check_vocab(256)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_config().check_vocab(257)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="smollm2-135m"):
        ModelConfig.from_name("smollm2-135")
    assert {"smollm2-135m", "smollm2-360m", "smollm2-1.7b", "smollm2-tiny"} <= set(preset_names())


def test_recipes_are_found_by_name_and_apart_from_presets():
    assert {"quickstart", "original"} <= set(configs.recipe_names())
    assert not set(configs.recipe_names()) & set(preset_names())
    assert json.loads(configs.recipe_path("quickstart").read_text())["max_steps"] > 0
    assert configs.preset_path("smollm2-tiny").name == "smollm2-tiny.json"
    with pytest.raises(ValueError, match="quickstart"):
        configs.recipe_path("quickstar")
    with pytest.raises(ValueError, match="unknown model preset"):
        configs.preset_path("../recipes/quickstart")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "bad.json")
