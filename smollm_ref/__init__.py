"""smollm_ref: a test-driven reference implementation of SmolLM2 (a LLaMA architecture) in PyTorch."""

from .config import ModelConfig
from .model import KVCache, LlamaForCausalLM

__all__ = ["KVCache", "LlamaForCausalLM", "ModelConfig"]
__version__ = "0.1.0"
