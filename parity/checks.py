"""The checks the suite and the command line share, each returning one report section."""

from __future__ import annotations

import torch

from . import engine
from .report import BoundSection, DiffSection

# smollm_ref in low precision may err at most this much more than transformers in the same precision.
BOUND_FACTOR = 1.25


def float32_forward(
    ours, theirs, input_ids, expect: str, title: str | None = None, info: dict | None = None, **inputs
) -> DiffSection:
    """Every captured tensor of one float32 forward; `expect` 'identical' or 'close' is what must hold.
    `inputs` (attention_mask, position_ids) go to both models."""
    n = input_ids.shape[1]
    diffs = engine.compare_models(ours, theirs, input_ids, **inputs)
    info = info or {"tokens": n, "dtype": "float32", "positions": f"0..{n - 1}"}
    return DiffSection(title or f"float32 forward, {n} tokens", diffs, expect, info)


def reference_capture(theirs, input_ids) -> dict[str, torch.Tensor]:
    """transformers-float32's every captured tensor: the reference both low-precision runs are measured against."""
    return engine.capture(theirs, engine.capture_points(theirs.config.num_hidden_layers), input_ids)


def low_precision(ours, theirs, input_ids, reference: dict, mode: str, dtype: torch.dtype = torch.bfloat16) -> BoundSection:
    """Both models in low precision, each measured against transformers-float32 (`reference`).
    mode 'autocast': float32 models run under torch.autocast(dtype); 'weights': models loaded in dtype."""
    if mode not in ("autocast", "weights"):
        raise ValueError(f"mode must be 'autocast' or 'weights', got {mode!r}")
    autocast = dtype if mode == "autocast" else None
    points = list(reference)
    theirs_low = engine.capture(theirs, points, input_ids, autocast=autocast)
    ours_low = engine.capture(ours, points, input_ids, autocast=autocast)
    checks = engine.bound_checks(engine.compare(ours_low, reference), engine.compare(theirs_low, reference), BOUND_FACTOR)
    argmax = engine.argmax_check(reference["lm_head"], theirs_low["lm_head"], ours_low["lm_head"], BOUND_FACTOR)
    identical = sum(d.identical for d in engine.compare(ours_low, theirs_low))
    name = str(dtype).removeprefix("torch.")
    n = input_ids.shape[1]
    info = {
        "tokens": n,
        "mode": f"torch.autocast({name}), float32 weights" if mode == "autocast" else f"weights loaded as {name}",
        "reference": "transformers float32",
        f"smollm_ref {name} vs transformers {name}": f"{identical}/{len(points)} tensors bit-identical",
    }
    return BoundSection(f"{name} ({mode}) error vs transformers float32, {n} tokens", checks, argmax, info)
