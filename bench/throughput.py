"""Throughput of smollm_ref's fast paths beside transformers (and litgpt where installed), in one process.

Same config, same weights, same batch, same dtype on every side; repetitions interleaved (A B A B ...)
so that a noisy machine slows both alike; warm-up and compilation excluded from the timings (compile
time reported apart); CUDA synchronised around every timed region. Each figure is reported as median
and spread (min..max) over the repetitions, and smollm_ref/transformers as the median and range of the
per-repetition ratios.

    PYTHONPATH=. python bench/throughput.py                       # CPU defaults, under 5 minutes on 2 cores
    PYTHONPATH=. python bench/throughput.py --device cuda --seq-len 2048 --batch-size 8 --modes bf16,bf16-compiled

Figures: forward tokens/s (logits of every position, no grad); training step tokens/s and batch time
(forward, backward, AdamW; no gradient clipping on either side); decode tokens/s at batch 1 and 8
(greedy, --new-tokens with KV cache, against transformers' `generate`); peak memory of a training step,
measured in a fresh subprocess per side (process peak RSS on CPU, max allocated on CUDA); MFU on CUDA
(6N + 12*L*H*D*T FLOPs per trained token, N counting lm_head even when tied), from `smollm_ref.metrics`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(ROOT) not in sys.path:  # run as a script without smollm_ref installed
    sys.path.insert(0, str(ROOT))

from bench import ceilings  # noqa: E402
from smollm_ref import metrics, precision  # noqa: E402
from smollm_ref.config import ModelConfig  # noqa: E402
from smollm_ref.fast import FastForward, FastGenerator, tuning  # noqa: E402
from smollm_ref.model import LlamaForCausalLM  # noqa: E402
from smollm_ref.train.step import adamw  # noqa: E402

MODES = ("float32", "bf16", "float32-compiled", "bf16-compiled")
TASKS = ("forward", "train", "decode", "memory")
# Without --modes: the figures the targets are about, in under 5 minutes on 2 CPU cores (float32 training
# alone would take two more minutes; ask for it with --modes float32). Training and memory run in bf16 where
# the machine's bf16 GEMMs are at least as fast as its float32 ones (bf16 in hardware: AVX512-BF16, AMX, any
# CUDA GPU), in float32 where bf16 is emulated (4-5x slower: a bf16 step alone would take the 5 minutes).
DEFAULT_PLAN = {"forward": ("float32",), "train": ("bf16",), "decode": ("float32", "bf16"), "memory": ("bf16",)}


@dataclass(frozen=True)
class Mode:
    name: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name.startswith("bf16") else torch.float32

    @property
    def compiled(self) -> bool:
        return self.name.endswith("-compiled")


def peak_flops(device: torch.device) -> tuple[str | None, float | None]:
    """(label, FLOP/s) of the device's dense bf16 peak from `metrics.DEVICE_PEAKS`, which every mode's MFU
    is reported against; (None, None) off CUDA."""
    if device.type != "cuda":
        return None, None
    name = metrics.device_name(device)
    peak = metrics.device_peak(name)
    if peak is None or peak.bf16 is None:
        return f"{name}: peak unknown, no MFU", None
    return f"{name}: {peak.name} bf16 dense {peak.bf16 / 1e12:.0f} TFLOP/s", peak.bf16


# ---- timing -----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def summary(values: list[float]) -> dict:
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread_pct": 100 * (max(values) - min(values)) / med if med else 0.0,
        "n": len(values),
    }


def interleave(sides: dict, repeats: int, device, progress, probe=None) -> dict[str, dict]:
    """sides: name -> (fn, units per call[, warm-up fn]). One untimed warm-up call each (its time is
    reported as warmup_s: it holds compilation; the warm-up fn, where given, is a shorter call that warms
    the same code), then `repeats` rounds of one call per side in turn. probe: (start, measure, stop) of a
    ceiling (`Ceilings.probe`), measured before the first round and after each; round i is held against the
    larger of the two measurements beside it ("_ceilings", one per round)."""
    out: dict[str, dict] = {}
    for name, (fn, _, *warm) in sides.items():
        out[name] = {"warmup_s": timed(warm[0] if warm else fn, device), "times": []}
        progress()
    start, measure, stop = probe or ((lambda: None), (lambda: None), (lambda: None))
    start()
    probes = [measure()]
    for _ in range(repeats):
        for name, (fn, _, *_warm) in sides.items():
            out[name]["times"].append(timed(fn, device))
            progress()
        probes.append(measure())
    stop()
    for name, (_, units, *_warm) in sides.items():
        times = out[name].pop("times")
        out[name]["seconds"] = summary(times)
        out[name]["tokens_per_s"] = summary([units / t for t in times])
        out[name]["_raw"] = times
        if probe:
            out[name]["_ceilings"] = [max(a, b) for a, b in zip(probes, probes[1:])]
    return out


def add_shares(res: dict, limits: ceilings.Ceilings, task: str, mode: Mode, units: int, batch: int = 1) -> None:
    """Each side's share of its ceiling: the median over rounds of (that round's rate / that round's ceiling)."""
    for r in res.values():
        shares = [limits.share(task, mode.dtype, units / t, batch, c) for t, c in zip(r["_raw"], r.pop("_ceilings"))]
        r["ceiling_share"] = summary(shares)["median"]
        r["ceiling_shares"] = shares


def add_ratios(results: dict, ours: str = "smollm_ref", base: str = "transformers") -> None:
    if ours not in results or base not in results:
        return
    ratios = [b / a for a, b in zip(results[ours]["_raw"], results[base]["_raw"])]  # time_base / time_ours
    results[ours]["ratio_vs_transformers"] = summary(ratios)


# ---- the sides ---------------------------------------------------------------------------------------


def build_models(config: ModelConfig, device, seed: int, peers: list[str]):
    torch.manual_seed(seed)
    ours = LlamaForCausalLM(config).to(device)
    models = {"smollm_ref": ours}
    if "transformers" in peers:
        from smollm_ref.convert import to_transformers

        models["transformers"] = to_transformers(ours)  # a copy of the same weights
    if "litgpt" in peers:
        lit = litgpt_model(config, device, seed)
        if lit is not None:
            models["litgpt"] = lit
    return models


def litgpt_model(config: ModelConfig, device, seed: int):
    """litgpt's GPT with its own SmolLM2-135M preset, random init (its preset unties the embeddings:
    162.8M parameters, so it does more work per token than the others)."""
    try:
        from litgpt.config import Config
        from litgpt.model import GPT
    except ImportError:
        return None
    torch.manual_seed(seed)
    model = GPT(Config.from_name("SmolLM2-135M")).to(device)
    model.max_seq_length = 4096
    return model


def forward_fns(models: dict, mode: Mode, ids, device):
    fns = {}
    for name, model in models.items():
        model.eval()
        if name == "smollm_ref":
            fast = FastForward(model, mode.dtype, compile=mode.compiled)

            def fn(fast=fast):
                with torch.inference_mode():
                    fast.logits(ids)
        else:
            run = torch.compile(model) if mode.compiled else model

            def fn(run=run, is_lit=name == "litgpt"):
                with torch.inference_mode(), precision.autocast(device.type, mode.dtype):
                    run(ids) if is_lit else run(ids).logits

        fns[name] = (fn, ids.numel())
    return fns


def train_fns(models: dict, mode: Mode, ids, device):
    """A training step per side: loss, backward, AdamW step, zero_grad. Optimizer state is built at the
    warm-up call (eager: a one-row batch). smollm_ref uses its fast paths (packed weights, chunked loss) and
    the trainer's AdamW (fused where the device has it); the peers their standard recipe (autocast, default
    AdamW)."""
    fns = {}
    for name, model in models.items():
        model.train()
        if name == "smollm_ref":
            fast = FastForward(model, mode.dtype, compile=mode.compiled)
            opt = adamw(model.parameters(), lr=1e-5)

            def fn(fast=fast, opt=opt, ids=ids):
                fast.loss(ids, ids).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            run = torch.compile(model) if mode.compiled else model
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def fn(run=run, opt=opt, is_lit=name == "litgpt", ids=ids):
                with precision.autocast(device.type, mode.dtype):
                    if is_lit:
                        logits = run(ids)
                        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
                    else:
                        loss = run(ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        # Eager modes warm up on one row (the same kernels, the optimizer state built; a full step is 10-40 s
        # on 2 CPU cores); compiled modes on the full batch, the shape their graph is built for.
        fns[name] = (fn, ids.numel()) if mode.compiled else (fn, ids.numel(), lambda fn=fn: fn(ids=ids[:1]))
    return fns


def decode_fns(models: dict, mode: Mode, prompt, new_tokens: int, outputs: dict):
    """Greedy decoding of `new_tokens` tokens (no early stop) with the model cast to the mode's dtype.
    Eager modes warm up on 8 tokens (the same kernels; a full-length warm-up would add a quarter to the
    decode time); compiled modes on the full length, whose cache shape the compiled graph is built for."""
    fns = {}
    warm_tokens = new_tokens if mode.compiled else min(new_tokens, 8)
    for name, model in models.items():
        if name == "litgpt":
            continue  # its generate API differs between versions; forward and train only
        model.eval()
        if name == "smollm_ref":
            gen = FastGenerator(model, compile=mode.compiled)

            def fn(gen=gen, name=name, n=new_tokens):
                outputs[name] = gen.generate(prompt, n, eos_token_id=[])
        else:
            if mode.compiled:
                model.generation_config.cache_implementation = "static"
                model.forward = torch.compile(model.forward, mode="reduce-overhead" if prompt.is_cuda else None, fullgraph=True)

            def fn(model=model, name=name, n=new_tokens):
                with torch.inference_mode():
                    outputs[name] = model.generate(
                        prompt,
                        attention_mask=torch.ones_like(prompt),
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        pad_token_id=0,
                    )

        fns[name] = (fn, prompt.shape[0] * new_tokens, lambda fn=fn: fn(n=warm_tokens))
    return fns


# ---- memory, one subprocess per side ----------------------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(args) -> dict:
    """In a fresh process: build one side, then peak memory over its warm-up step (eager: one row; it builds
    the optimizer state) and `--memory-steps` training steps: the peak is a step with the optimizer state in
    place. CPU: the process's peak RSS (VmHWM, reset after set-up through /proc/self/clear_refs); CUDA: max
    allocated. Both workers import transformers, so library memory is the same on both sides."""
    import ctypes

    import transformers  # noqa: F401  (same imports on both sides)

    device = torch.device(args.device)
    config = ModelConfig.from_name(args.config)
    mode = Mode(args.modes)
    side = args.memory_worker
    models = build_models(config, device, args.seed, ["transformers"] if side == "transformers" else [])
    if side != "smollm_ref":
        del models["smollm_ref"]
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    fn, _, *warm = train_fns(models, mode, ids, device)[side]
    gc.collect()
    if device.type == "cpu":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _rss_kib("VmRSS") * 1024
    else:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    (warm[0] if warm else fn)()
    for _ in range(args.memory_steps):
        fn()
    sync(device)
    peak = _rss_kib("VmHWM") * 1024 if device.type == "cpu" else torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "before_bytes": before, "delta_bytes": peak - before}


def measure_memory(args, mode: Mode, sides: list[str]) -> dict:
    out = {}
    for side in sides:  # in turn: side by side, the two would only share the cores and take longer
        cmd = [sys.executable, __file__, "--memory-worker", side, "--modes", mode.name, "--device", args.device,
               "--config", args.config, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--seed", str(args.seed), "--memory-steps", str(args.memory_steps)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            out[side] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
            continue
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "peak_bytes" in out.get("smollm_ref", {}) and "peak_bytes" in out.get("transformers", {}):
        ours, base = out["smollm_ref"], out["transformers"]
        ours["peak_ratio_vs_transformers"] = ours["peak_bytes"] / base["peak_bytes"]
        ours["delta_ratio_vs_transformers"] = ours["delta_bytes"] / max(base["delta_bytes"], 1)
    return out


# ---- report -----------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else tuning.cpu_model(),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        # On a shared CPU, OpenMP threads that spin while waiting for a descheduled peer slow small ops
        # 4x; OMP_WAIT_POLICY=PASSIVE (set before starting Python) avoids it. Recorded because it matters.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import litgpt

        env["litgpt"] = getattr(litgpt, "__version__", "installed")
    except ImportError:
        env["litgpt"] = None
    env["cpu"] = ceilings.cpu_info()
    return env


def fmt_row(task, mode, side, r, unit="tok/s") -> str:
    if "error" in r:
        return f"| {task} | {mode} | {side} | error: {r['error']} | | | |"
    tps = r["tokens_per_s"]
    ratio = r.get("ratio_vs_transformers")
    ratio_s = f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else ""
    extra = f" MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    batch = f"{r['seconds']['median'] * 1000:.0f} ms"
    if mode.endswith("-compiled"):  # the warm-up call holds the compilation
        batch += f" (first call, compiling: {r['warmup_s']:.0f} s)"
    share = f"{100 * r['ceiling_share']:.0f}%" if r.get("ceiling_share") is not None else ""
    return f"| {task} | {mode} | {side} | {tps['median']:,.0f} {unit} (±{tps['spread_pct'] / 2:.0f}%){extra} | {batch} | {ratio_s} | {share} |"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python bench/throughput.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if present)"
    )
    p.add_argument("--config", default="smollm2-135m", help="preset name or config.json path (default smollm2-135m)")
    p.add_argument("--batch-size", type=int, default=4, help="training/forward batch (default 4)")
    p.add_argument("--seq-len", type=int, default=512, help="training/forward sequence length (default 512)")
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma list of {', '.join(MODES)}, each task in each (default: forward in float32, decode in float32 and "
        "bf16, train and memory in bf16)",
    )
    p.add_argument("--tasks", default="forward,train,decode,memory", help=f"comma list of {', '.join(TASKS)} (default all)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per side, after one warm-up (default 3)")
    p.add_argument("--decode-batch-sizes", default=None, help="comma list (default 1,8; without --modes, 1)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run (default 64)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens before decoding (default 32)")
    p.add_argument(
        "--peers", default="transformers,litgpt", help="comma list of transformers, litgpt (litgpt only where installed)"
    )
    p.add_argument(
        "--memory-steps",
        type=int,
        default=1,
        help="full training steps in each memory subprocess after its warm-up step, which builds the optimizer state (default 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [m for m in (args.modes or "").split(",") if m and m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    bad = [t for t in args.tasks.split(",") if t not in TASKS]
    if bad:
        p.error(f"--tasks: unknown {bad}; choose from {', '.join(TASKS)}")
    if args.decode_batch_sizes and not all(b.strip().isdigit() and int(b) > 0 for b in args.decode_batch_sizes.split(",")):
        p.error(f"--decode-batch-sizes: {args.decode_batch_sizes!r} is not a comma list of positive integers, e.g. 1,8")
    for name in ("batch_size", "seq_len", "repeats", "new_tokens", "prompt_len", "memory_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device on this machine; use --device cpu")
    try:
        ModelConfig.from_name(args.config)
    except (ValueError, FileNotFoundError) as e:
        p.error(f"--config: {e}")
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json} is a directory; give a file path")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(args)))
        return 0
    from tqdm import tqdm

    device = torch.device(args.device)
    config = ModelConfig.from_name(args.config)
    tasks = args.tasks.split(",")
    plan = [(Mode(m), t) for m in args.modes.split(",") for t in tasks] if args.modes else []
    peers = [p for p in args.peers.split(",") if p]
    if args.decode_batch_sizes:
        decode_batches = {m: [int(b) for b in args.decode_batch_sizes.split(",")] for m in MODES}
    else:
        # The default plan's 5 minutes: batch 1 is what the targets are about (ask for 8 with --decode-batch-sizes).
        decode_batches = {m: [1] if not args.modes else [1, 8] for m in MODES}
    peak_label, peak = peak_flops(device)
    fpt = metrics.flops_per_token(config, args.seq_len)
    results: dict = {"env": environment(device), "args": vars(args), "peak": peak_label, "flops_per_token": fpt, "runs": []}
    models = build_models(config, device, args.seed, peers)
    if "litgpt" in peers and "litgpt" not in models:
        results["litgpt"] = "not installed: skipped"
    limits = ceilings.Ceilings(config, args.batch_size * args.seq_len, args.seq_len, models["smollm_ref"], say)
    results["ceilings"] = limits.measured
    if not args.modes:
        plan, results["plan"] = default_plan(tasks, limits)
    for mode, task in plan:  # before the bar: a few seconds, each said on a line of its own
        if task in ("forward", "train"):
            limits.gemm(mode.dtype, train=task == "train")
        elif task == "decode":
            limits.bandwidth(mode.dtype)
    n = len(models)
    steps = sum(
        (args.repeats + 1) * (n if t != "decode" else min(n, 2) * len(decode_batches[m.name])) for m, t in plan if t != "memory"
    )
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    bar = tqdm(total=steps, desc="bench", unit="call")
    run = Run(args, config, device, models, ids, results, bar, fpt, peak, decode_batches, limits)
    for mode, task in plan:
        try:
            run_task(task, mode, run)
        except Exception as e:  # one failing figure must not lose the others
            results["runs"].append({"task": task, "mode": mode.name, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"\n{task} {mode.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        results["tuning"] = tuning.choices()
        if args.json:
            write_json(results, args.json)
    bar.close()
    print_table(results)
    if args.json:
        print(f"wrote {write_json(results, args.json)}")
    return 0


def default_plan(tasks: list[str], limits: ceilings.Ceilings) -> tuple[list, str]:
    """(mode, task) pairs of the default plan and a line saying why training runs in the dtype it does."""
    train = {t: DEFAULT_PLAN[t] for t in ("train", "memory")}
    note = "train and memory in bf16"
    if any(t in tasks for t in train) and limits.device.type == "cpu":
        speedup = limits.bf16_speedup()
        if speedup < 1:
            train = {t: ("float32",) for t in train}
            note = (f"train and memory in float32: a bf16 GEMM runs at {speedup:.2f}x float32's speed here (no bf16 in "
                    "hardware); ask for bf16 with --modes bf16 --tasks train")  # fmt: skip
    modes = {**DEFAULT_PLAN, **train}
    return [(Mode(m), t) for m in ("float32", "bf16") for t in tasks if m in modes[t]], note


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def write_json(results: dict, path: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


@dataclass
class Run:
    """What every task of one benchmark run shares."""

    args: argparse.Namespace
    config: ModelConfig
    device: torch.device
    models: dict  # side name -> model, each holding the same weights
    ids: torch.Tensor  # (batch, seq_len) tokens of the forward and training tasks
    results: dict  # what the JSON holds; each task appends to results["runs"]
    bar: Any  # the tqdm progress bar, one update per timed call
    flops_per_token: int  # training FLOPs per token (`metrics.flops_per_token`)
    peak: float | None  # dense bf16 FLOP/s that MFU is against; None: no MFU
    decode_batches: dict[str, list[int]]  # mode name -> decode batch sizes
    limits: ceilings.Ceilings  # the machine's GEMM and bandwidth ceilings, measured as figures need them


def run_task(task: str, mode: Mode, run: Run) -> None:
    """Measure one task in one mode and append it to run.results["runs"]."""
    args, models, device, results, bar = run.args, run.models, run.device, run.results, run.bar
    if task == "memory":
        bar.set_postfix_str(f"memory {mode.name} (subprocesses)")
        results["runs"].append(
            {"task": "memory", "mode": mode.name, "sides": measure_memory(args, mode, ["smollm_ref", "transformers"])}
        )
        return
    if task in ("forward", "train"):
        bar.set_postfix_str(f"{task} {mode.name}")
        fns = (forward_fns if task == "forward" else train_fns)(models, mode, run.ids, device)
        res = interleave(fns, args.repeats, device, lambda: bar.update(1), run.limits.probe(task, mode.dtype))
        add_ratios(res)
        add_shares(res, run.limits, task, mode, run.ids.numel())
        for r in res.values():
            per_token = run.flops_per_token if task == "train" else run.flops_per_token / 3
            r["mfu"] = r["tokens_per_s"]["median"] * per_token / run.peak if run.peak else None
            r.pop("_raw")
        results["runs"].append({"task": task, "mode": mode.name, "batch": [args.batch_size, args.seq_len], "sides": res})
        del fns
        gc.collect()
        return
    import copy

    for b in run.decode_batches[mode.name]:
        bar.set_postfix_str(f"decode b{b} {mode.name}")
        decode_models = {k: v for k, v in models.items() if k != "litgpt"}
        if mode.dtype != torch.float32 or mode.compiled:  # a compiled recipe rebinds forward: work on copies
            decode_models = {k: copy.deepcopy(v).to(mode.dtype) for k, v in decode_models.items()}
        prompt = torch.randint(0, run.config.vocab_size, (b, args.prompt_len), device=device)
        outputs: dict = {}
        fns = decode_fns(decode_models, mode, prompt, args.new_tokens, outputs)
        res = interleave(fns, args.repeats, device, lambda: bar.update(1), run.limits.probe("decode", mode.dtype))
        add_ratios(res)
        add_shares(res, run.limits, "decode", mode, b * args.new_tokens, b)
        for r in res.values():
            r.pop("_raw")
        if len(outputs) == 2:
            same = torch.equal(outputs["smollm_ref"].cpu(), outputs["transformers"].cpu())
            res["smollm_ref"]["same_tokens_as_transformers"] = same
        results["runs"].append(
            {"task": f"decode b{b}", "mode": mode.name, "batch": [b, args.prompt_len, args.new_tokens], "sides": res}
        )
        del decode_models
        gc.collect()


def print_table(results: dict) -> None:
    env = results["env"]
    print(
        f"\n{env['device']} ({env['device_type']}, {env['cpu_count']} CPUs), torch {env['torch']}, transformers {env['transformers']}"
    )
    if results.get("peak"):
        print(f"MFU against {results['peak']}; {results['flops_per_token'] / 1e9:.3f} GFLOP per trained token")
    if results.get("litgpt"):
        print(f"litgpt: {results['litgpt']}")
    cpu = env.get("cpu") or {}
    print(f"CPU: {cpu.get('model')}, flags {' '.join(cpu.get('flags', []))}, torch kernels {cpu.get('torch_capability')}")
    if results.get("plan"):
        print(f"default plan: {results['plan']}")
    for key, c in results.get("ceilings", {}).items():
        if key.startswith("gemm"):
            print(
                f"ceiling {key}: {c['flops_per_s'] / 1e9:,.0f} GFLOP/s at the step's shapes ({c['gemm_seconds_per_step']:.2f} s of GEMMs per step)"
            )
        else:
            print(f"ceiling {key}: {c['bytes_per_s'] / 1e9:.1f} GB/s (streaming read {c['stream_read_bytes_per_s'] / 1e9:.1f}, "
                  f"batch-1 matmul pass {c['gemv_pass_bytes_per_s'] / 1e9:.1f}; {c['weight_bytes_per_step'] / 1e6:,.0f} MB of weights per step)")  # fmt: skip
    print(
        "\n| task | mode | side | throughput (median, ±half-range) | time per call | smollm_ref / transformers | share of ceiling |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        if "error" in run:
            print(f"| {run['task']} | {run['mode']} | all | error: {run['error'].splitlines()[0][:160]} | | | |")
            continue
        for side, r in run["sides"].items():
            label = side + (" (untied, 162.8M params)" if side == "litgpt" else "")
            if run["task"] == "memory":
                if "error" in r:
                    print(f"| memory | {run['mode']} | {side} | error: {r['error']} | | | |")
                    continue
                ratio = r.get("peak_ratio_vs_transformers")
                ratio_s = f"{ratio:.2f}x peak, {r['delta_ratio_vs_transformers']:.2f}x step delta" if ratio else ""
                print(
                    f"| peak memory | {run['mode']} | {label} | {r['peak_bytes'] / 2**20:,.0f} MiB (step +{r['delta_bytes'] / 2**20:,.0f} MiB) | | {ratio_s} | |"
                )
                continue
            row = fmt_row(run["task"], run["mode"], label, r)
            if r.get("same_tokens_as_transformers") is not None:
                row += " same tokens" if r["same_tokens_as_transformers"] else " tokens differ"
            print(row)


if __name__ == "__main__":
    sys.exit(main())
