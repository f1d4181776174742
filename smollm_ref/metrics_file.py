"""A run's metrics.jsonl: its format (one JSON object a line, an integer `step` and a `time` in each), and
how it is read. The trainer's logger (`smollm_ref.train.logger`) writes it with `encode`; `--resume` truncates
it (`truncate_after`); `python -m smollm_ref.plot` reads it without importing the trainer."""

from __future__ import annotations

import itertools
import json
import time
import warnings
from pathlib import Path

from . import storage

NAME = "metrics.jsonl"  # in the run directory
METRICS_LINE_LIMIT = 16 * 2**20  # a record is a few hundred bytes, one with a sample text a few kilobytes


def encode(step: int, values: dict) -> str:
    """The line (newline included) that records `values` at `step`, stamped with the time (Unix seconds, to the millisecond)."""
    record = {"step": step, "time": round(time.time(), 3), **values}
    return json.dumps(record) + "\n"


def read_records(path: Path, partial_last: str = "refuse") -> list[tuple[str, dict]]:
    """(line, record) of every non-blank line of a metrics.jsonl, streamed line by line (the file of a long run
    is tens of MB; each line is read at most METRICS_LINE_LIMIT bytes). Every record must be a JSON object
    whose `step` is an integer.

    `partial_last="drop"` drops, with a warning naming the file, a last line that is cut off (no newline and
    not a record: what a kill or a full disk leaves mid-write); "refuse" treats it as any broken line.

    Raises `FileNotFoundError` when absent, `storage.BadFile` (a ValueError), one line naming the file and
    the line, for a FIFO, device or directory, a line too long, not UTF-8, not JSON, or not such a record."""
    return [(line, record) for _, line, record in _numbered_records(path, partial_last)]


def _numbered_records(path: Path, partial_last: str) -> list[tuple[int, str, dict]]:
    """`read_records` with each record's line number (counting from 1, blank lines included)."""
    fix = "fix or remove that line, then run again"
    records = []
    with storage.open_regular(path, "metrics file", "move it aside (a run writes a new one), then run again") as f:
        for number in itertools.count(1):
            raw = f.readline(METRICS_LINE_LIMIT + 1)
            if not raw:
                break
            if len(raw) > METRICS_LINE_LIMIT:
                raise storage.BadFile(f"{path} line {number} is longer than {METRICS_LINE_LIMIT:,} bytes; {fix}")
            try:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                record = storage.loads_json(line, f"{path} line {number}")
                if not isinstance(record, dict):
                    raise storage.BadFile(f"{path} line {number} is not a JSON object")
                if not storage.is_int(record.get("step")):
                    raise storage.BadFile(f'{path} line {number} is a record without an integer "step"')
            except (UnicodeDecodeError, storage.BadFile) as e:
                if partial_last == "drop" and not raw.endswith(b"\n"):  # only the last line can lack one
                    warnings.warn(f"{path}: dropped a partial last line (a run stopped while writing it)", stacklevel=4)
                    break
                what = f"{path} line {number} is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
                raise storage.BadFile(f"{what}; {fix}") from None
            records.append((number, line, record))
    return records


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (a resumed run redoes them), keeping the file's other lines. A partial last
    line (what a full disk or a kill mid-write leaves) is dropped with a warning naming the file; any other
    broken line, or a metrics.jsonl that is no regular file, is a `storage.BadFile` (a ValueError) naming
    it, raised before anything is written."""
    if not path.exists():
        return
    kept = [line for line, record in read_records(path, partial_last="drop") if record["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (`read_records`); a cut-off last line (a run writing it now, or one
    killed mid-write) is left out with a warning."""
    return [record for _, record in read_records(path, partial_last="drop")]


def read_numbered_metrics(path: Path) -> list[tuple[int, dict]]:
    """`read_metrics` with each record's line number in the file (counting from 1), to name a bad value's line."""
    return [(number, record) for number, _, record in _numbered_records(path, "drop")]
