"""Training metrics: FLOPs per token, device peaks, throughput, the WandB mode decision (the logger's), metrics.jsonl
written by the logger and read back (`metrics_file`)."""

from __future__ import annotations

import pytest

from smollm_ref import metrics, metrics_file
from smollm_ref.config import ModelConfig
from smollm_ref.train import logger
from smollm_ref.train.step_metrics import Throughput


def test_flops_per_token_of_smollm2_135m():
    config = ModelConfig.from_name("smollm2-135m")
    # counted by hand: 30 layers x (attention 884,736 + MLP 2,654,208 + norms 1,152) + final norm 576,
    # plus the lm_head 49,152 x 576 (tied: the same weights as the embedding, still a matmul per token)
    n = 30 * (884_736 + 2_654_208 + 1_152) + 576 + 49_152 * 576
    assert metrics.matmul_params(config) == n == config.num_parameters()
    assert metrics.flops_per_token(config, 512) == 6 * n + 12 * 30 * 9 * 64 * 512


def test_untied_head_is_the_same_matmul_work():
    tied = ModelConfig.from_name("smollm2-tiny")
    untied = tied.replace(tie_word_embeddings=False)
    assert untied.num_parameters() == tied.num_parameters() + tied.vocab_size * tied.hidden_size
    assert metrics.flops_per_token(untied, 64) == metrics.flops_per_token(tied, 64)


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989e12),
        ("NVIDIA H200", "bf16-mixed", 989e12),
        ("NVIDIA H100 PCIe", "bf16-mixed", 756e12),
        ("NVIDIA H100 PCIe", "fp32", 378e12),
        ("NVIDIA H100 80GB HBM3", "fp32", 494.7e12),
        ("NVIDIA H200", "fp16-mixed", 989e12),
        ("NVIDIA A100-SXM4-80GB", "fp32", 156e12),
        ("NVIDIA A100 80GB PCIe", "bf16-mixed", 312e12),
        ("NVIDIA L4", "bf16-mixed", 121e12),
        ("NVIDIA L4", "fp32", 60e12),
        ("NVIDIA A10", "bf16-mixed", 125e12),
        ("NVIDIA A10", "fp32", 62.5e12),
        # whole words: an L40S is no L4 and an A10G no A10; the NVL parts are not the SXM ones
        ("NVIDIA L40S", "bf16-mixed", None),
        ("NVIDIA A10G", "bf16-mixed", None),
        ("NVIDIA H100 NVL", "bf16-mixed", None),
        ("NVIDIA GeForce RTX 3090", "bf16-mixed", None),
        ("NVIDIA H100 80GB HBM3", "auto", None),
        ("cpu", "fp32", None),
    ],
)
def test_peak_flops_known_devices_only(name, precision, peak):
    assert metrics.peak_flops(name, precision) == peak


def test_average_throughput_leaves_out_the_first_step():
    t = Throughput()
    assert t.update(100, 10.0) == (10.0, 10.0)  # nothing timed yet: the first step's own rate
    assert t.update(100, 1.0) == (100.0, 100.0)
    assert t.update(300, 1.0) == (300.0, 200.0)


def test_wandb_mode_is_decided_without_waiting(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert logger.wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert logger.wandb_mode() == "offline"  # no key: never tries the network
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # nothing listens there
    assert logger.wandb_mode() == "offline"


def test_metrics_log_appends_and_truncates_for_a_resume(tmp_path):
    log = logger.MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log.log(3, {"val_loss": 0.5})
    log.close()
    metrics_file.truncate_after(tmp_path / "metrics.jsonl", 2)
    records = metrics_file.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0)]
