"""In-memory conversion between smollm_ref's `LlamaForCausalLM` and transformers' `LlamaForCausalLM`.

The parameter names are the same on both sides, so conversion is a config translation plus a
`load_state_dict(strict=True)`; nothing is renamed or permuted.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .model import LlamaForCausalLM
from .weights import load_into


def hf_config(config: ModelConfig, attn_implementation: str = "sdpa"):
    """transformers' `LlamaConfig` with the same meaning as `config`."""
    import transformers

    return transformers.LlamaConfig(**config.to_dict(), attn_implementation=attn_implementation)


def to_transformers(model: LlamaForCausalLM, attn_implementation: str = "sdpa"):
    """A transformers `LlamaForCausalLM` with this model's weights (copied), dtype and device."""
    import transformers

    param = next(model.parameters())
    hf = transformers.LlamaForCausalLM(hf_config(model.config, attn_implementation)).to(dtype=param.dtype)
    state = {k: v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf.to(param.device).train(model.training)


def from_transformers(hf_model) -> LlamaForCausalLM:
    """A smollm_ref model with a transformers Llama model's weights (copied), dtype and device."""
    cfg = hf_model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"from_transformers needs a Llama model, got model_type={getattr(cfg, 'model_type', None)!r}")
    config = ModelConfig.from_dict(cfg.to_diff_dict())
    param = next(hf_model.parameters())
    model = LlamaForCausalLM(config).to(dtype=param.dtype)
    with torch.no_grad():
        load_into(model, dict(hf_model.state_dict()))
    return model.to(param.device).train(hf_model.training)
