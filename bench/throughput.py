"""Throughput of smollm_ref's fast paths beside transformers (and litgpt where installed), in one process.

Same config, same weights, same batch, same dtype and the same work on every side: training runs the
trainer's own step (`train.step.train_step`: loss, backward, clipping at the trainer's default, the
trainer's AdamW, fused where the device has it, for every side) with the loss the trainer uses in that
mode (the fast step in mixed precision, the reference model in float32); bf16 forward and decode run every
side on a bf16 copy of the weights, cast once outside the timing. Repetitions interleaved, the side order
rotated each round (A B C, B C A, C A B, ...) so that neither a noisy machine nor going first favours a
side; warm-up and compilation excluded from the timings (compile time reported apart); CUDA synchronised
around every timed region. Each figure is the median and spread (min..max) over the repetitions, and
smollm_ref/transformers the median and range of the per-repetition ratios; `--runs N` repeats the whole
plan N times, keeps every run's JSON and reports the median over runs.

    PYTHONPATH=. python bench/throughput.py                       # CPU defaults, under 5 minutes on 2 cores
    PYTHONPATH=. python bench/throughput.py --runs 3 --json bench/results/cpu.json   # cpu.run1.json ... + medians
    PYTHONPATH=. python bench/throughput.py --device cuda --seq-len 2048 --batch-size 8 --modes bf16,bf16-compiled

Figures: forward tokens/s (logits of every position, no grad); training step tokens/s and batch time
(forward, backward, gradient clipping, AdamW); decode tokens/s at batch 1 and 8
(greedy, --new-tokens with KV cache, against transformers' `generate`); peak memory of a training step,
measured in a fresh subprocess per side (process peak RSS on CPU, max allocated on CUDA); MFU on CUDA
(6N + 12*L*H*D*T FLOPs per trained token, N counting lm_head even when tied), from `smollm_ref.metrics`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(ROOT) not in sys.path:  # run as a script without smollm_ref installed
    sys.path.insert(0, str(ROOT))

from bench import ceilings  # noqa: E402
from smollm_ref import metrics  # noqa: E402
from smollm_ref.config import ModelConfig  # noqa: E402
from smollm_ref.fast import FastForward, FastGenerator, tuning  # noqa: E402
from smollm_ref.model import LlamaForCausalLM  # noqa: E402
from smollm_ref.precision import autocast_context  # noqa: E402
from smollm_ref.train import adamw, lm_loss, train_step  # noqa: E402
from smollm_ref.train.options import TrainConfig  # noqa: E402
from smollm_ref.train.step import fast_forward  # noqa: E402
from smollm_ref.weights import read_config  # noqa: E402

MODES = ("float32", "bf16", "float32-compiled", "bf16-compiled")
TASKS = ("forward", "train", "decode", "memory")
# Without --modes: the figures the targets are about, in under 5 minutes on 2 CPU cores (float32 training
# alone would take two more minutes; ask for it with --modes float32). Training and memory run in bf16 where
# the machine's bf16 GEMMs are at least as fast as its float32 ones (bf16 in hardware: AVX512-BF16, AMX, any
# CUDA GPU), in float32 where bf16 is emulated (4-5x slower: a bf16 step alone would take the 5 minutes).
# How each task treats the weights in a lower dtype, the same on every side (recorded in the JSON).
WEIGHTS = {
    "forward": "every side on a copy cast once to the dtype, outside the timing, no autocast",
    "train": "float32 weights, cast to the dtype inside every step on every side (autocast; smollm_ref's fast step packs them)",
}
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

    @property
    def precision(self) -> str:
        """The trainer's --precision for this mode."""
        return "bf16-mixed" if self.dtype == torch.bfloat16 else "fp32"


@dataclass
class Side:
    """One side of a figure: `fn()` is one timed call of `units` tokens; `warm()` a shorter call warming the
    same code (default: fn itself); training sides also name their optimizer and the step they run."""

    fn: Callable[[], object]
    units: int
    warm: Callable[[], object] | None = None
    optimizer: torch.optim.Optimizer | None = None
    step: str | None = None  # training: "fast" or "reference", the trainer's step for the mode


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


def round_order(names: list[str], i: int) -> list[str]:
    """The side order of round i (0-based): `names` rotated by i, so that each side goes first, second, ...
    equally often (a side that always ran first would always meet the machine as the previous round left it)."""
    k = i % len(names) if names else 0
    return names[k:] + names[:k]


def interleave(sides: dict[str, Side], repeats: int, device, progress, probe=None) -> dict[str, dict]:
    """One untimed warm-up call per side (its time is reported as warmup_s: it holds compilation), then
    `repeats` rounds of one call per side, in the order `round_order` gives. probe: (start, measure, stop)
    of a ceiling (`Ceilings.probe`), measured before the first round and after each; round i is held
    against the larger of the two measurements beside it ("_ceilings", one per round)."""
    out: dict[str, dict] = {}
    for name, side in sides.items():
        out[name] = {"warmup_s": timed(side.warm or side.fn, device), "times": []}
        progress()
    start, measure, stop = probe or ((lambda: None), (lambda: None), (lambda: None))
    start()
    probes = [measure()]
    for i in range(repeats):
        for name in round_order(list(sides), i):
            out[name]["times"].append(timed(sides[name].fn, device))
            progress()
        probes.append(measure())
    stop()
    for name, side in sides.items():
        times = out[name].pop("times")
        out[name]["seconds"] = summary(times)
        out[name]["tokens_per_s"] = summary([side.units / t for t in times])
        out[name]["_raw"] = times
        if probe:
            out[name]["_ceilings"] = [max(a, b) for a, b in zip(probes, probes[1:])]
    return out


def add_shares(res: dict, limits: ceilings.Ceilings, task: str, mode: Mode, units: int, batch: int = 1) -> None:
    """Each side's share of its ceiling: the median over rounds of (that round's rate / that round's ceiling).
    A share above 1 means the ceiling missed a faster kernel (or the machine sped up between probes): it is
    kept as measured and flagged (`above_ceiling`), never passed off as a percentage."""
    for r in res.values():
        shares = [limits.share(task, mode.dtype, units / t, batch, c) for t, c in zip(r["_raw"], r.pop("_ceilings"))]
        r["ceiling_share"] = summary(shares)["median"]
        r["ceiling_shares"] = shares
        r["above_ceiling"] = r["ceiling_share"] > 1


def add_ratios(results: dict, ours: str = "smollm_ref", base: str = "transformers") -> None:
    if ours not in results or base not in results:
        return
    ratios = [b / a for a, b in zip(results[ours]["_raw"], results[base]["_raw"])]  # time_base / time_ours
    results[ours]["ratio_vs_transformers"] = summary(ratios)


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


def cast_copies(models: dict, dtype: torch.dtype) -> dict:
    """The models as they are in float32; in a lower dtype, a copy of each cast to it (once, untimed): the
    same treatment for every side, as a model served in bf16 is cast once, not at every call."""
    import copy

    if dtype == torch.float32:
        return models
    return {name: copy.deepcopy(model).to(dtype) for name, model in models.items()}


def forward_fns(models: dict, mode: Mode, ids, device) -> dict[str, Side]:
    """Logits of every position, no grad, each side on `models` as given (`cast_copies`: in bf16 every side
    runs on weights cast once outside the timing, none under autocast)."""
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
                with torch.inference_mode():
                    run(ids) if is_lit else run(ids).logits

        fns[name] = Side(fn, ids.numel())
    return fns


def trainer_config(mode: Mode) -> TrainConfig:
    """The trainer's options for `mode` (its defaults otherwise: fast step on, grad_clip 1.0)."""
    return TrainConfig.from_options(precision=mode.precision, compile=mode.compiled)


def bench_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """Every side's optimizer: the trainer's AdamW (`train.optim.adamw`: fused where the device has it, else
    foreach), one group, so that no side's step is faster for its optimizer alone (fused AdamW is 5x the
    unfused default on 135M on CPU)."""
    return adamw(model.parameters(), lr=1e-5)


def _peer_loss(model, is_lit: bool):
    """A peer's `train.lm_loss`: mean next-token cross-entropy over float32 logits, as the trainer's."""
    if not is_lit:
        return functools.partial(lm_loss, model)

    def loss(inputs, targets):
        logits = model(inputs)
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return loss


def train_fns(models: dict, mode: Mode, ids, device) -> dict[str, Side]:
    """A training step per side, each through the trainer's own `train_step` (loss, backward, clipping at the
    trainer's default grad_clip, optimizer step, zero_grad) with `bench_optimizer`, so every side does the
    same work around its loss. smollm_ref's loss is what the trainer runs in this mode (`train.step.
    fast_forward`: the fast step where the trainer uses it, mixed precision; else the reference model
    under the trainer's autocast, compiled in compiled modes, as the trainer compiles it); the peers' is
    their model under the same autocast. Targets: `ids` shifted by one (the last position wraps round).
    Optimizer state is built at the warm-up call (eager: a one-row batch)."""
    cfg = trainer_config(mode)
    targets = torch.roll(ids, -1, dims=1)
    fns = {}
    for name, model in models.items():
        model.train()
        autocast = autocast_context(device, mode.precision)
        step = None
        if name == "smollm_ref":
            fast, _ = fast_forward(model, cfg.model, 1, mode.precision)
            if fast is not None:
                loss_fn, autocast, step = fast.lm_loss, None, "fast"  # the fast step does its own mixed precision
            else:
                loss_fn, step = functools.partial(lm_loss, torch.compile(model) if mode.compiled else model), "reference"
        else:
            loss_fn = _peer_loss(torch.compile(model) if mode.compiled else model, name == "litgpt")
        opt = bench_optimizer(model)

        def fn(model=model, loss_fn=loss_fn, opt=opt, autocast=autocast, batch=(ids, targets)):
            train_step(model, [batch], opt, grad_clip=cfg.optim.grad_clip, autocast=autocast, loss_fn=loss_fn)

        # Eager modes warm up on one row (the same kernels, the optimizer state built; a full step is 10-40 s
        # on 2 CPU cores); compiled modes on the full batch, the shape their graph is built for.
        warm = None if mode.compiled else (lambda fn=fn: fn(batch=(ids[:1], targets[:1])))
        fns[name] = Side(fn, ids.numel(), warm, opt, step)
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

        fns[name] = Side(fn, prompt.shape[0] * new_tokens, lambda fn=fn: fn(n=warm_tokens))
    return fns


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
    config = read_config(args.config)
    mode = Mode(args.modes)
    side = args.memory_worker
    models = build_models(config, device, args.seed, ["transformers"] if side == "transformers" else [])
    if side != "smollm_ref":
        del models["smollm_ref"]
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    step = train_fns(models, mode, ids, device)[side]
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
    (step.warm or step.fn)()
    for _ in range(args.memory_steps):
        step.fn()
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
    if r.get("above_ceiling"):
        share = f"**ABOVE the measured ceiling ({r['ceiling_share']:.2f}x): the ceiling is wrong, not a share**"
    return f"| {task} | {mode} | {side} | {tps['median']:,.0f} {unit} (±{tps['spread_pct'] / 2:.0f}%){extra} | {batch} | {ratio_s} | {share} |"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python bench/throughput.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if present)"
    )
    p.add_argument(
        "--config",
        default="smollm2-135m",
        help="model config as train --model-config takes it: preset, config.json, model directory, run, checkpoint or "
        ".gguf (default smollm2-135m)",
    )
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
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="run the whole plan N times; with --json PATH each run's JSON is kept as PATH's NAME.runK.json and PATH "
        "holds the medians over runs (default 1)",
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
    for name in ("batch_size", "seq_len", "repeats", "new_tokens", "prompt_len", "memory_steps", "runs"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device on this machine; use --device cpu")
    try:
        read_config(args.config)
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
    every = []
    for i in range(args.runs):
        if args.runs > 1:
            say(f"run {i + 1} of {args.runs}")
        path = run_json_path(args.json, i, args.runs) if args.json else None
        every.append(bench_once(args, path))
    if args.runs > 1:
        over = over_runs(every)
        print_over_runs(over, args.runs)
        if args.json:
            files = [run_json_path(args.json, i, args.runs).name for i in range(args.runs)]
            out = {"runs_files": files, "over_runs": over, "args": vars(args), "env": every[-1]["env"]}
            print(f"wrote {write_json(out, args.json)} (medians over the runs in {', '.join(files)})")
    return 0


def run_json_path(path: str, i: int, runs: int) -> Path:
    """Where run i (0-based) of `runs` writes its JSON: `path` itself for a single run, else NAME.runK.json
    beside it (K from 1), `path` then holding the medians over runs."""
    path = Path(path)
    return path if runs == 1 else path.with_name(f"{path.stem}.run{i + 1}{path.suffix}")


def over_runs(every: list[dict]) -> dict:
    """Per figure ("task mode side"), the median and range over runs of each run's median tokens/s and of its
    median ratio to transformers: one run's figure is never the verdict."""
    figures: dict[str, dict[str, list[float]]] = {}
    for results in every:
        for run in results["runs"]:
            for side, r in run.get("sides", {}).items():
                if "tokens_per_s" not in r:
                    continue
                f = figures.setdefault(
                    f"{run['task']} | {run['mode']} | {side}", {"tokens_per_s": [], "ratio_vs_transformers": []}
                )
                f["tokens_per_s"].append(r["tokens_per_s"]["median"])
                if "ratio_vs_transformers" in r:
                    f["ratio_vs_transformers"].append(r["ratio_vs_transformers"]["median"])
    return {key: {k: summary(v) for k, v in f.items() if v} for key, f in figures.items()}


def print_over_runs(over: dict, runs: int) -> None:
    print(f"\nOver {runs} runs (median of each run's median; range over runs):\n")
    print("| task | mode | side | throughput | smollm_ref / transformers |")
    print("|---|---|---|---|---|")
    for key, f in over.items():
        tps = f["tokens_per_s"]
        ratio = f.get("ratio_vs_transformers")
        ratio_s = f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else ""
        print(f"| {key} | {tps['median']:,.0f} tok/s ({tps['min']:,.0f}-{tps['max']:,.0f}) | {ratio_s} |")


def bench_once(args, json_path: Path | None) -> dict:
    """One run of the whole plan; its results, also written to `json_path` as each task ends."""
    from tqdm import tqdm

    device = torch.device(args.device)
    config = read_config(args.config)
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
        if json_path:
            write_json(results, json_path)
    bar.close()
    print_table(results)
    if json_path:
        print(f"wrote {write_json(results, json_path)}")
    return results


def default_plan(tasks: list[str], limits: ceilings.Ceilings) -> tuple[list, str]:
    """(mode, task) pairs of the default plan and a line saying why training runs in the dtype it does."""
    train = {t: DEFAULT_PLAN[t] for t in ("train", "memory")}
    note = "train and memory in bf16"
    if any(t in tasks for t in train) and limits.device.type == "cpu":
        speedup = limits.bf16_speedup()
        if speedup < 1:
            train = {t: ("float32",) for t in train}
            note = (f"train and memory in float32: a bf16 GEMM runs at {speedup:.2f}x float32's speed here (each at "
                    "its fastest implementation); ask for bf16 with --modes bf16 --tasks train")  # fmt: skip
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
        if task == "forward":
            fns = forward_fns(cast_copies(models, mode.dtype), mode, run.ids, device)
        else:  # float32 master weights, as the trainer keeps them, in every mode
            fns = train_fns(models, mode, run.ids, device)
        res = interleave(fns, args.repeats, device, lambda: bar.update(1), run.limits.probe(task, mode.dtype))
        add_ratios(res)
        add_shares(res, run.limits, task, mode, run.ids.numel())
        for name, r in res.items():
            per_token = run.flops_per_token if task == "train" else run.flops_per_token / 3
            r["mfu"] = r["tokens_per_s"]["median"] * per_token / run.peak if run.peak else None
            r.pop("_raw")
            if fns[name].optimizer is not None:
                opt = fns[name].optimizer
                r["optimizer"] = {"class": type(opt).__name__, "fused": bool(opt.defaults.get("fused")),
                                  "foreach": bool(opt.defaults.get("foreach"))}  # fmt: skip
            if fns[name].step is not None:
                r["step"] = fns[name].step
        results["runs"].append({"task": task, "mode": mode.name, "batch": [args.batch_size, args.seq_len], "sides": res,
                                "weights": WEIGHTS[task] if mode.dtype != torch.float32 else "float32"})  # fmt: skip
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
        if key == "peak fma":
            print(f"CPU peak: {c['derivation']}" + ("" if c.get("float32") is None else
                  f" = {c['float32'] / 1e9:,.0f} GFLOP/s float32, {c['bfloat16'] / 1e9:,.0f} bfloat16"))  # fmt: skip
        elif key.startswith("gemm"):
            fastest = sorted({p["fastest"] for p in c["parts"]})
            line = (f"ceiling {key}: {c['flops_per_s'] / 1e9:,.0f} GFLOP/s at the step's shapes, each at its fastest "
                    f"implementation ({', '.join(fastest)}; {c['gemm_seconds_per_step']:.2f} s of GEMMs per step)")  # fmt: skip
            if c.get("share_of_theoretical_peak") is not None:
                line += f", {100 * c['share_of_theoretical_peak']:.0f}% of the CPU's theoretical peak"
                if c["share_of_theoretical_peak"] > 1:
                    line += f" (so the cores ran at {c['clock_implied_hz'] / 1e9:.2f} GHz or more, above /proc/cpuinfo's clock)"
            print(line)
        else:
            print(f"ceiling {key}: {c['bytes_per_s'] / 1e9:.1f} GB/s (streaming read {c['stream_read_bytes_per_s'] / 1e9:.1f}, "
                  f"batch-1 matmul pass {c['gemv_pass_bytes_per_s'] / 1e9:.1f}; {c['weight_bytes_per_step'] / 1e6:,.0f} MB of weights per step)")  # fmt: skip
    print(
        "\n| task | mode | side | throughput (median, ±half-range) | time per call | smollm_ref / transformers | share of ceiling |"
    )
    print("|---|---|---|---|---|---|---|")
    above: list[str] = []
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
            if r.get("above_ceiling"):
                above.append(f"{run['task']} {run['mode']} {side}: {r['ceiling_share']:.2f}x its ceiling")
    for line in above:
        say(
            f"WARNING: a figure above its measured ceiling, {line}: a kernel faster than every implementation the "
            "ceiling timed (bench/ceilings.py gemm_candidates), or the machine sped up between the probes"
        )


if __name__ == "__main__":
    sys.exit(main())
