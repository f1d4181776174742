"""Training metrics: FLOPs per token and the devices' peaks they are measured against (MFU). The step's figures
(time, tokens/s, MFU, epoch) are `smollm_ref.train.step_metrics`'; where they go is the trainer's logger's business
(`smollm_ref.train.logger`, `smollm_ref.metrics_file`).

MFU = achieved model FLOP/s / the device's peak. Model FLOPs per token follow PaLM (Chowdhery et al.
2022, appendix B): 6N for the matmuls of forward and backward, N counting every weight a token is
multiplied by (the lm_head included even when it is tied to the embedding, the embedding lookup
excluded), plus 12 * L * H * Q * T for attention scores and values (L layers, H heads, Q head dim,
T sequence length), no causal discount. Peaks are dense (no sparsity) tensor-core numbers from the
vendors' data sheets; an unknown device gets no MFU rather than a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class DevicePeak:
    """One accelerator's dense (no sparsity) tensor-core peaks, FLOP/s, from the vendor's data sheet."""

    name: str  # the part, as its data sheet names it
    bf16: float | None  # bf16 and fp16 alike
    tf32: float | None  # what fp32 matmuls run at on CUDA under torch.set_float32_matmul_precision("high")


# Rows match the words of `torch.cuda.get_device_name` ("NVIDIA A100-SXM4-80GB" -> NVIDIA, A100, SXM4, 80GB):
# the first row whose words all appear wins, so a variant comes before its family, and whole words keep an
# A100 from reading as an A10 and an L40S as an L4. The NVL parts run at other clocks and power than the
# SXM ones; without their own figures here they get no MFU rather than the SXM peak.
DEVICE_PEAKS: tuple[tuple[tuple[str, ...], DevicePeak], ...] = (
    (("H100", "PCIe"), DevicePeak("H100 PCIe", 756e12, 378e12)),
    (("H100", "NVL"), DevicePeak("H100 NVL", None, None)),
    (("H100",), DevicePeak("H100 SXM", 989e12, 494.7e12)),  # "NVIDIA H100 80GB HBM3"
    (("H200", "NVL"), DevicePeak("H200 NVL", None, None)),
    (("H200",), DevicePeak("H200", 989e12, 494.7e12)),  # the H100 SXM's compute with more, faster memory
    (("A100",), DevicePeak("A100", 312e12, 156e12)),  # SXM and PCIe alike
    (("L4",), DevicePeak("L4", 121e12, 60e12)),
    (("A10",), DevicePeak("A10", 125e12, 62.5e12)),
)
# Which peak a `--precision` runs at: mixed precision on the bf16/fp16 tensor cores, fp32 on the TF32 ones.
_PEAK_FIELD = {"bf16-mixed": "bf16", "fp16-mixed": "bf16", "fp32": "tf32"}


def matmul_params(config: ModelConfig) -> int:
    """Weights each token is multiplied by: all parameters minus the embedding lookup, plus the lm_head."""
    h, v = config.hidden_size, config.vocab_size
    embedding = v * h
    lm_head = v * h
    total = config.num_parameters()  # a tied lm_head is counted once, as the embedding
    untied_head = 0 if config.tie_word_embeddings else lm_head
    return total - untied_head - embedding + lm_head


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_params(config) + attention


def device_peak(device_name: str) -> DevicePeak | None:
    """The row of DEVICE_PEAKS for a device name, or None for a device not in the table."""
    words = set(re.split(r"[\s_-]+", device_name.upper()))
    for required, peak in DEVICE_PEAKS:
        if words.issuperset(w.upper() for w in required):
            return peak
    return None


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of `device_name` at a resolved `--precision`; None where unknown (no MFU then)."""
    peak = device_peak(device_name)
    field = _PEAK_FIELD.get(precision)
    return getattr(peak, field) if peak is not None and field is not None else None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
