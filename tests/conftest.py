"""Shared fixtures: deterministic seeds and default dtype restored around every test, tiny configs,
and transformers twins of tiny models built through the production converter."""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from smollm_ref.config import ModelConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Kernel choices the fast paths time (`smollm_ref.fast.tuning`) go to a cache of this run's own, never the
# user's ~/.cache; subprocesses inherit it.
os.environ["SMOLLM_REF_CACHE"] = tempfile.mkdtemp(prefix="smollm-ref-tuning-")

# The same Hypothesis profiles as tests/test_properties.py registers, here so that every property test gets
# them whichever test files run: `ci` (derandomized, bounded; HYPOTHESIS_PROFILE=ci, what nox uses), `dev` else.
_HYPOTHESIS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, max_examples=20, print_blob=True, **_HYPOTHESIS)
settings.register_profile("dev", max_examples=40, **_HYPOTHESIS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _restore_global_state():
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield
    torch.set_default_dtype(dtype)


def tiny_config(**changes) -> ModelConfig:
    """A 2-layer GQA model small enough for exhaustive checks (vocab 256, 4 query heads, 2 KV heads)."""
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture
def tiny():
    return tiny_config()


def pytest_collection_modifyitems(config, items):
    """CUDA tests are skipped, with the reason shown, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
