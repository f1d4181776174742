"""The parity harness itself: its measurements are right, and a deliberately broken model fails it with the
first divergent layer named. A tiny random transformers model stands in for the real weights, so this runs
in seconds; smollm_ref reads it through its real loader, and each mutant differs from it in one thing only
(its own config, or one submodule of its own instance), never by patching smollm_ref globally."""

from __future__ import annotations

import json
import math

import pytest
import torch

from parity import checks, engine, sources
from parity.__main__ import main as parity_main
from parity.report import DiffSection, Report
from smollm_ref import precision
from smollm_ref.config import ModelConfig
from smollm_ref.model import LlamaForCausalLM, LlamaRotaryEmbedding
from smollm_ref.weights import from_pretrained, load_into, read_state_dict
from tests.conftest import tiny_config

VOCAB = tiny_config().vocab_size


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random transformers LlamaForCausalLM (GQA, 3 layers, tied), saved by transformers itself."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    # initializer_range 0.2: large enough that an eps change moves the norms past float32 tolerance
    config = LlamaConfig(**tiny_config(num_hidden_layers=3, initializer_range=0.2).to_dict())
    model = HFLlama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms at exactly 1 would hide a norm weight applied wrongly
                p.uniform_(0.5, 1.5)
            if "q_proj" in name or "k_proj" in name:  # sharp, position-sensitive attention, as in a trained model
                p.mul_(3.0)
    directory = tmp_path_factory.mktemp("tiny-transformers")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def theirs(tiny_dir):
    return sources.load_transformers(tiny_dir)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))


def mutant(tiny_dir, **config_changes) -> LlamaForCausalLM:
    """smollm_ref's model of `tiny_dir` built from a changed config and loaded with the checkpoint's tensors."""
    model = LlamaForCausalLM(ModelConfig.from_json(tiny_dir / "config.json").replace(**config_changes))
    load_into(model, read_state_dict(tiny_dir))
    return model.eval()


class Bfloat16Rope(LlamaRotaryEmbedding):
    """A classic mistake: angles and cos/sin computed in bf16 (8 mantissa bits: angle errors of ~0.1 rad
    by position 50)."""

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.bfloat16) * self.inv_freq.to(torch.bfloat16)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rope_in_bf16(tiny_dir) -> LlamaForCausalLM:
    model = mutant(tiny_dir)
    model.model.rotary_emb = Bfloat16Rope(model.config)  # this instance only
    return model


def test_unbroken_model_passes(tiny_dir, theirs, ids):
    section = checks.float32_forward(from_pretrained(tiny_dir), theirs, ids, "close")
    assert section.ok, section.verdict()
    assert len(section.diffs) == len(engine.capture_points(3))
    if sources.expect_bit_identical("cpu"):
        assert section.identical == len(section.diffs), section.verdict()


@pytest.mark.parametrize(
    "build, first",
    [
        (lambda d: mutant(d, rope_theta=10000.0), "model.layers.0.self_attn"),  # RoPE angles: attention first
        (lambda d: mutant(d, rms_norm_eps=1e-6), "model.layers.0.input_layernorm"),  # the very first norm
        (rope_in_bf16, "model.layers.0.self_attn"),
    ],
    ids=["theta 10000", "eps 1e-6", "rope in bf16"],
)
def test_broken_model_fails_naming_first_divergent_layer(build, first, tiny_dir, theirs, ids, tmp_path):
    section = checks.float32_forward(build(tiny_dir), theirs, ids, "close")
    assert not section.ok
    assert section.first_failure.name == first
    assert section.first_divergence.name == first  # everything before it is still bit-identical
    assert all(d.identical for d in section.diffs[: [d.name for d in section.diffs].index(first)])
    assert first in section.verdict() and "FAIL" in section.verdict()
    report = Report({"model": "tiny"})
    report.add(section)
    md, js = report.write(tmp_path)
    assert f"first divergence: {first}" in md.read_text()
    assert json.loads(js.read_text())["sections"][0]["first_divergence"] == first


def test_broken_model_fails_gradient_check(tiny_dir, theirs, ids):
    broken = mutant(tiny_dir, rms_norm_eps=1e-6)
    diffs = engine.compare(engine.gradients(broken, ids), engine.gradients(theirs, ids))
    section = DiffSection("gradients", diffs, "close")
    assert not section.ok and section.first_failure is not None


def test_low_precision_bound_fails_for_a_worse_model(tiny_dir, theirs):
    """A model that is right in float32 but computes RoPE in bf16 errs more than transformers-bf16 does, once
    positions are large enough for bf16 angles to be coarse (spacing 1 rad from position 128 up)."""
    ids = torch.randint(0, VOCAB, (1, 256), generator=torch.Generator().manual_seed(4))
    ref = checks.reference_capture(theirs, ids)
    good = checks.low_precision(from_pretrained(tiny_dir), theirs, ids, ref, "autocast")
    assert all(c.ok for c in good.checks), good.verdict()
    bad = checks.low_precision(rope_in_bf16(tiny_dir), theirs, ids, ref, "autocast")
    assert bad.first_failure is not None and bad.first_failure.name == "model.layers.0.self_attn", bad.verdict()
    assert bad.first_failure.ratio > 1.5, bad.verdict()  # well past the bound, not a marginal failure
    assert not bad.ok


def test_diff_measures():
    b = torch.tensor([1.0, -2.0, 4.0, 0.0])
    same = engine.diff("x", b.clone(), b)
    assert same.identical and same.close and same.max_abs == 0 and same.cosine == 1.0 and same.ref_max == 4.0
    a = torch.tensor([1.0, -2.0, 4.5, 0.0])
    d = engine.diff("x", a, b)
    assert not d.identical and not d.close
    assert d.max_abs == 0.5 and d.max_rel == pytest.approx(0.125)
    assert d.rel_l2 == pytest.approx(0.5 / math.sqrt(21))
    a64, b64 = a.double(), b.double()
    assert d.cosine == pytest.approx(float(a64 @ b64 / (a64.norm() * b64.norm())), abs=1e-12)
    tiny_error = engine.diff("x", b + torch.tensor([0, 0, 4e-6, 0]), b)  # within atol 1e-5 + rtol * 4
    assert tiny_error.close and not tiny_error.identical
    assert engine.diff("x", torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])).max_rel == math.inf
    nan = engine.diff("x", torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    assert not nan.identical and not nan.close  # NaN is never parity, even on both sides
    assert engine.diff("x", b.bfloat16(), b).identical  # same values in another dtype
    with pytest.raises(ValueError, match="shapes differ"):
        engine.diff("x", a[:3], b)


def test_argmax_check_counts_only_clear_positions():
    ref = torch.tensor([[[5.0, 1.0, 0.0], [2.0, 1.9, 0.0]]])  # margins 4.0 and 0.1
    theirs_low = ref + torch.tensor([[[0.5, 0.0, 0.0], [0.05, 0.0, 0.0]]])  # eps 0.5 and 0.05
    swapped = torch.tensor([[[5.0, 1.0, 0.0], [1.9, 2.0, 0.0]]])  # flips the unclear position only
    check = engine.argmax_check(ref, theirs_low, swapped, 1.25)
    assert (check.positions, check.clear, check.agree_clear, check.agree_all) == (2, 1, 1, 1)
    wrong = torch.tensor([[[1.0, 5.0, 0.0], [2.0, 1.9, 0.0]]])  # flips the clear one
    assert engine.argmax_check(ref, theirs_low, wrong, 1.25).first_disagreement == 0


def test_capture_runs_under_the_shared_autocast(theirs, ids):
    """`autocast=` goes through `smollm_ref.precision.autocast`: bf16 matmuls, and float32 or None a plain
    float32 forward."""
    points = ["lm_head", engine.LOSS]
    low = engine.capture(theirs, points, ids, autocast=torch.bfloat16)
    assert low["lm_head"].dtype == torch.bfloat16
    with precision.autocast("cpu", torch.bfloat16):
        direct = theirs(input_ids=ids).logits
    assert torch.equal(low["lm_head"], direct)
    plain, fp32 = engine.capture(theirs, points, ids), engine.capture(theirs, points, ids, autocast=torch.float32)
    assert plain["lm_head"].dtype == torch.float32 and torch.equal(plain["lm_head"], fp32["lm_head"])


def test_hooks_reject_missing_module(theirs, ids):
    with pytest.raises(KeyError, match="no module"):
        engine.capture(theirs, ["model.layers.9"], ids)


def test_command_line_prints_table_and_writes_reports(tiny_dir, tmp_path, capsys):
    assert parity_main(["--model", str(tiny_dir), "--tokens", "5,20", "--report-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "float32 forward, 20 tokens" in out and "PASS" in out
    assert "layers 0-2  15/15" in out or "layer 2 " in out  # identical layers fold into one row
    assert (tmp_path / "parity.md").exists() and (tmp_path / "parity.json").exists()


def test_command_line_rejects_bad_source(tmp_path, capsys):
    assert parity_main(["--model", str(tmp_path / "missing"), "--report-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "parity.md").exists()
