"""Mixed precision in one place: the names the trainer takes (`--precision`) and the autocast context
that the trainer, the benchmark and the parity harness all run their reference forwards under.

Float32 weights stay the master copy in every mode; autocast casts to the compute dtype per op."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed")
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def autocast(device_type: str, dtype: torch.dtype | None):
    """`torch.autocast` to `dtype`; a no-op context for None or float32 (plain float32 compute)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def autocast_context(device: torch.device, precision: str):
    """The autocast of a resolved `--precision` (fp32, bf16-mixed or fp16-mixed) on `device`."""
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision must be one of {tuple(COMPUTE_DTYPES)}, got {precision!r}")
    return autocast(device.type, COMPUTE_DTYPES[precision])


def resolve_precision(precision: str, device: torch.device) -> str:
    """`--precision` on `device`: auto is bf16-mixed on a CUDA GPU with bfloat16, else fp32. Raises ValueError
    (one line) for a precision the device cannot run (fp16-mixed needs CUDA's GradScaler)."""
    if precision == "auto":
        return "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16-mixed" and device.type != "cuda":
        raise ValueError(f"--precision fp16-mixed needs a CUDA device (GradScaler), not {device.type}; use bf16-mixed or fp32")
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support; use --precision fp16-mixed or fp32")
    return precision
