"""Files from elsewhere (checkpoints, config.json, weights, tokenizers) and options from a person: each bad one
is refused with one line that says why, quickly, before anything large is read or allocated (issue #11)."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

from smollm_ref import checkpoint
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


# ---- item 3: a manifest names files inside its checkpoint, regular ones, of the recorded size --------------


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
def test_manifest_cannot_point_outside_or_at_endless_files(tmp_path, spoil, reason):
    checkpoint.write(tmp_path, 1, _payload)
    bad = checkpoint.write(tmp_path, 2, _payload)
    _rewrite_manifest(bad, lambda files, manifest: spoil(files, bad))
    start = time.monotonic()
    with pytest.raises(checkpoint.CheckpointError, match=reason) as info:
        checkpoint.verify(bad)
    assert time.monotonic() - start < 1.0  # refused, not hashed (the old code read /dev/zero forever)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
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


# ---- item 8: config values of the wrong type name the field ------------------------------------------------


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
