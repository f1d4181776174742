"""`python -m smollm_ref.train`: options from a recipe and the command line, one-line errors, exit codes
(0 done, 1 diverged, 2 bad input, 128 + signal when stopped by SIGINT/SIGTERM with a checkpoint written).
Under torchrun a refusal that every process of a node meets alike (`SharedRefusal`) is printed by the node's
first process alone; any other error by every process that meets it, since it may be that process's own."""

from __future__ import annotations

import os
import sys

from .. import storage
from .loop import train
from .options import SharedRefusal, build_parser, read_recipe, resolve_config
from .run import Diverged


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    recipe = args.pop("recipe", None)
    try:
        options = {**(read_recipe(recipe) if recipe else {}), **args}
        cfg, found = resolve_config(options)
        result = train(cfg, found)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # TrainError, DataError, CheckpointError, SourceError, config errors
        if not isinstance(e, SharedRefusal) or int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not storage.is_disk_full(e):
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(
            f"error: {e.strerror or e}{where}; free some space, then continue with --resume auto --out-dir RUN_DIR",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    if result.stopped_by_signal is not None:
        return 128 + result.stopped_by_signal
    return 0
