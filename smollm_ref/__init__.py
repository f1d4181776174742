"""smollm_ref: a test-driven reference implementation of SmolLM2 (a LLaMA architecture) in PyTorch."""

from . import evaluate  # a module you can call: smollm_ref.evaluate(model, tokenizer, tasks)
from .config import ModelConfig
from .generate import generate
from .model import KVCache, LlamaForCausalLM
from .weights import from_pretrained, save_pretrained


def load_tokenizer(*args, **kwargs):
    """See `smollm_ref.tokenizer.load_tokenizer` (imported lazily: it pulls in transformers)."""
    from .tokenizer import load_tokenizer as _load

    return _load(*args, **kwargs)


def to_transformers(*args, **kwargs):
    """See `smollm_ref.convert.to_transformers`."""
    from .convert import to_transformers as _to

    return _to(*args, **kwargs)


def from_transformers(*args, **kwargs):
    """See `smollm_ref.convert.from_transformers`."""
    from .convert import from_transformers as _from

    return _from(*args, **kwargs)


__all__ = [
    "KVCache",
    "evaluate",
    "LlamaForCausalLM",
    "ModelConfig",
    "from_pretrained",
    "from_transformers",
    "generate",
    "load_tokenizer",
    "save_pretrained",
    "to_transformers",
]
__version__ = "0.1.0"
