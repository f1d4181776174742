"""Checkpoint directories: atomic writes, manifests that catch corruption, pruning, RNG state round trips."""

from __future__ import annotations

import os
import random
import stat
import warnings

import numpy as np
import pytest
import torch

from smollm_ref import checkpoint


def _payload(tag: str):
    def write(tmp):
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(tag.encode() * 100)
        torch.save({"step": 1, "x": torch.arange(3)}, tmp / checkpoint.STATE)

    return write


def test_write_verifies_and_keeps_the_last_k(tmp_path):
    for step in (1, 2, 3):
        path = checkpoint.write(tmp_path, step, _payload(f"s{step}"), keep_last=2)
        checkpoint.verify(path)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 3]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left
    assert checkpoint.latest_valid(tmp_path).name == "step_000003"
    rewritten = checkpoint.write(tmp_path, 3, _payload("again"), keep_last=2)  # same step again: replaced whole
    assert (rewritten / "model.safetensors").read_bytes().startswith(b"again")


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest", "missing_file"])
def test_damaged_latest_checkpoint_falls_back_to_previous_with_warning(tmp_path, damage):
    checkpoint.write(tmp_path, 1, _payload("good"))
    bad = checkpoint.write(tmp_path, 2, _payload("newer"))
    weights = bad / "model.safetensors"
    if damage == "flip_byte":
        blob = bytearray(weights.read_bytes())
        blob[10] ^= 0xFF
        weights.write_bytes(bytes(blob))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:50])
    elif damage == "no_manifest":
        (bad / checkpoint.MANIFEST).unlink()  # what a crash before the last write leaves
    else:
        (bad / checkpoint.STATE).unlink()
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.verify(bad)
    with pytest.warns(UserWarning, match="step_000002.*falling back"):
        assert checkpoint.latest_valid(tmp_path).name == "step_000001"
    with pytest.warns(UserWarning):
        assert checkpoint.find(tmp_path).name == "step_000001"  # a run's checkpoints/ folder works too
    with pytest.raises(checkpoint.CheckpointError, match="step_000002"):
        checkpoint.find(bad)  # naming the damaged checkpoint itself is an error, not a silent substitute


def test_find_errors_name_the_path(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.find(tmp_path / "nope")
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        checkpoint.find(tmp_path)


def test_step_of_reads_only_checkpoint_names(tmp_path):
    assert checkpoint.step_of(tmp_path / checkpoint.step_dir_name(200)) == 200
    assert checkpoint.step_of("runs/x/checkpoints/step_1234567") == 1234567
    for name in ("run-2024-05-01", "step_12a", "best_step_000100", ".tmp-step_000100-42"):
        assert checkpoint.step_of(name) is None, name


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    torch.save({"rng": checkpoint.rng_state()}, tmp_path / "s.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = torch.load(tmp_path / "s.pt", weights_only=True)
    checkpoint.set_rng_state(state["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_compile_prefix_is_stripped():
    state = {"_orig_mod.model.norm.weight": torch.ones(2), "lm_head.weight": torch.zeros(1)}
    assert sorted(checkpoint.strip_compile_prefix(state)) == ["lm_head.weight", "model.norm.weight"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_and_directory_gets_the_umask_mode(tmp_path, umask):
    # On a shared machine a teammate must be able to read a checkpoint: safetensors' own 0600 would stop them.
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from smollm_ref.model import LlamaForCausalLM
    from smollm_ref.weights import save_pretrained
    from tests.conftest import tiny_config

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))

    def write_files(tmp):  # as the trainer writes a checkpoint
        save_pretrained(LlamaForCausalLM(tiny_config()), tmp, tokenizer)
        torch.save({"step": 1}, tmp / checkpoint.STATE)

    old = os.umask(umask)
    try:
        path = checkpoint.write(tmp_path / "run" / "checkpoints", 1, write_files)
    finally:
        os.umask(old)
    checkpoint.verify(path)
    written = [path, *path.rglob("*")]
    assert {p.name for p in written} >= {"model.safetensors", "config.json", "tokenizer.json", checkpoint.STATE}
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in written}
    modes |= {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in path.parents if tmp_path in p.parents}
    expected = {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask for name in modes}
    assert modes == expected
