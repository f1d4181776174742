"""Where the time of one smollm_ref fast-path call goes, by kind of op: what limits a figure of the bench.

    PYTHONPATH=. python bench/op_profile.py --task decode --dtype float32
    PYTHONPATH=. python bench/op_profile.py --task train --dtype bf16 --json out.json

One warm-up call, then one call under torch.profiler; self CPU (or CUDA) time summed by kind: matmuls
(mm, addmm, bmm, oneDNN's linear), attention (SDPA's kernels), the optimizer, everything else; with the
op-call count, which on CPU is what the "everything else" of a decode step costs (a few microseconds of
dispatch each). Same model, batch and weights as `bench/throughput.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import Mode, build_models, cast_copies, decode_fns, forward_fns, train_fns  # noqa: E402
from smollm_ref.weights import read_config  # noqa: E402

KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm"),
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_flash_attention_forward",
        "aten::_flash_attention_backward",
    ),  # fmt: skip
    "optimizer": (
        "aten::_fused_adamw_",
        "aten::_foreach_mul_",
        "aten::_foreach_addcmul_",
        "aten::_foreach_lerp_",
        "aten::_foreach_sqrt",
        "aten::_foreach_div_",
        "aten::_foreach_add_",
        "aten::_foreach_addcdiv_",
    ),  # fmt: skip
}


def kind_of(name: str) -> str:
    return next((kind for kind, names in KINDS.items() if name in names), "other")


def profile(fn, device) -> dict:
    fn()
    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    by_kind: dict[str, float] = defaultdict(float)
    calls = 0
    top = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        by_kind[kind_of(event.key)] += self_us / 1e6
        calls += event.count
        top.append((self_us / 1e6, event.key, event.count))
    top.sort(reverse=True)
    return {
        "wall_s": wall,
        "by_kind_s": dict(by_kind),
        "op_calls": calls,
        "top": [{"op": k, "s": round(s, 4), "calls": n} for s, k, n in top[:12]],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/op_profile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("forward", "train", "decode"), required=True)
    p.add_argument("--dtype", choices=("float32", "bf16"), default="float32")
    p.add_argument(
        "--config",
        default="smollm2-135m",
        help="model config as train --model-config takes it: preset, config.json, model directory, run, checkpoint or "
        ".gguf (default smollm2-135m)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="forward and train batch; decode batch is 1 (default 4)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens (default 32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for name in ("batch_size", "seq_len", "new_tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    try:
        config = read_config(args.config)
    except (ValueError, FileNotFoundError) as e:
        p.error(f"--config: {e}")
    device = torch.device(args.device)
    mode = Mode(args.dtype)
    models = build_models(config, device, 0, [])
    if args.task == "decode":
        model = models["smollm_ref"].to(mode.dtype)
        prompt = torch.randint(0, config.vocab_size, (1, 32), device=device)
        fn = decode_fns({"smollm_ref": model}, mode, prompt, args.new_tokens, {})["smollm_ref"].fn
        units = args.new_tokens
    else:
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
        if args.task == "forward":  # as the bench times it: on a copy cast once to the dtype
            fn = forward_fns(cast_copies(models, mode.dtype), mode, ids, device)["smollm_ref"].fn
        else:
            fn = train_fns(models, mode, ids, device)["smollm_ref"].fn
        units = 1
    result = {"task": args.task, "dtype": args.dtype, "per": "token" if args.task == "decode" else "call", **profile(fn, device)}
    scale = 1 / units
    print(f"{args.task} {args.dtype}: {1000 * result['wall_s'] * scale:.1f} ms per {result['per']} under the profiler, "
          f"{result['op_calls'] * scale:,.0f} op calls")  # fmt: skip
    for kind, s in sorted(result["by_kind_s"].items(), key=lambda kv: -kv[1]):
        print(f"  {kind:10s} {1000 * s * scale:8.1f} ms  {100 * s / sum(result['by_kind_s'].values()):4.0f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
