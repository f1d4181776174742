"""Choosing between two ways of computing the same thing by timing both, on this machine, once.

A fast path that wins on one CPU can lose on the next: oneDNN's prepacked weights stream twice as fast as
`F.linear` at batch 1 on an AMD EPYC and 30% slower on an Intel Xeon. So where the fast path has a choice
(`packing.choose_layouts`), it times every candidate on the real shapes and keeps the fastest, with the
reference way kept unless another beats it by `MARGIN`: a choice is never slower than the reference as
measured.

Choices are cached for the process, keyed by what was timed. A choice whose timing took longer than
`PERSIST_AFTER_S` is also kept on disk, in a JSON file under `$SMOLLM_REF_CACHE` (default
`~/.cache/smollm_ref`), keyed by the machine as well (CPU model, torch version, threads), so that the
next process does not pay for it again. `SMOLLM_REF_TUNING=off` turns measuring off: the reference way,
always (for debugging, or to take timing noise out of a comparison).

The file is a cache, never trusted: it is read with a size limit (`CACHE_LIMIT`), regular files only, parsed
once per process (again only when its path, modification time or size change), and a record that is not what
`fastest` writes (not a mapping, a choice that is not one of the candidates offered, or one whose first call
fails, such as a layout this dtype cannot use) counts as absent: it costs a re-measurement, whose result
replaces it on disk.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import storage

MARGIN = 0.03  # another way must be this much faster than the reference to be chosen
PERSIST_AFTER_S = 1.0  # timings that cost more than this are written to disk
FILE_NAME = "tuning.json"
# A record is ~300 bytes; a few thousand choices (machines x torch versions x thread counts x shapes) fit. A
# larger file is not ours to parse at every start: it is taken as corrupt, and replaced at the next write.
CACHE_LIMIT = 4 * 2**20

_CHOICES: dict[str, str] = {}  # this process's choices, by full key
_DISK: tuple[tuple, dict] | None = None  # ((path, mtime_ns, size, inode), the parsed file): one parse per version


def enabled() -> bool:
    return os.environ.get("SMOLLM_REF_TUNING", "on").lower() not in ("off", "0", "false", "no")


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: torch.device | str = "cpu") -> str:
    """What a timing depends on besides the shapes: the processor, torch's version, its thread count."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return f"{device.type}|{name}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def cache_path() -> Path:
    root = os.environ.get("SMOLLM_REF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smollm_ref"
    return Path(root) / FILE_NAME


def _read_disk() -> dict:
    """The cache file's top-level mapping (machine -> key -> record); {} when absent, unreadable, too large,
    not a regular file (a FIFO would block the read) or not a JSON object. Parsed once per version of the
    file: `fastest` asks for every kind of weight and every shape."""
    global _DISK
    path = cache_path()
    try:
        info = os.stat(path)
    except (OSError, ValueError):  # none yet (or a path the OS refuses): measure
        return {}
    version = (str(path), info.st_mtime_ns, info.st_size, info.st_ino)
    if _DISK is not None and _DISK[0] == version:
        return _DISK[1]
    try:
        data = storage.read_small_json(path, "tuning cache", CACHE_LIMIT)
    except (OSError, ValueError):  # unreadable or corrupt (storage.BadFile is a ValueError): measure again
        data = {}
    data = data if isinstance(data, dict) else {}
    _DISK = (version, data)
    return data


def _stored_choice(machine: str, key: str) -> str | None:
    """The choice recorded for `key` on `machine`, if the record has the shape `_write_disk` gives it."""
    records = _read_disk().get(machine)
    record = records.get(key) if isinstance(records, dict) else None
    choice = record.get("choice") if isinstance(record, dict) else None
    return choice if isinstance(choice, str) else None


def _write_disk(machine: str, key: str, record: dict) -> None:
    """Add one choice to the file, written whole to a temporary and renamed: a crash never leaves half a file.
    What was unusable in the file (all of it, or this machine's part) is replaced. Best effort: a cache that
    cannot be written costs a re-measurement next time, not the run."""
    global _DISK
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = dict(_read_disk())
        records = data.get(machine)
        data[machine] = {**(records if isinstance(records, dict) else {}), key: record}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        return
    _DISK = None  # read back (once) at the next call: another process may have written between


def time_candidates(
    candidates: dict[str, Callable[[], object]],
    repeats: int = 5,
    sync=None,
    warm: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Best-of-`repeats` seconds per candidate, after one untimed call each (unless already `warm`ed by the
    caller), calls interleaved (A B A B ...) so that a machine that slows down mid-way slows every candidate
    alike. `clock` gives seconds (tests give a clock of their own)."""
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values() if warm else ():
        fn()
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync()
            start = clock()
            fn()
            sync()
            times[name].append(clock() - start)
    return {name: min(ts) for name, ts in times.items()}


def _works(fn: Callable[[], object]) -> bool:
    """Whether a (non-reference) candidate's call succeeds: oneDNN cannot reorder every dtype on every torch."""
    try:
        fn()
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


def _working(candidates: dict[str, Callable[[], object]], reference: str) -> dict[str, Callable[[], object]]:
    """The candidates whose first (untimed, warming) call succeeds; the reference is not guarded: if it
    fails, the work itself does."""
    working = {}
    for name, fn in candidates.items():
        if name == reference:
            fn()
        elif not _works(fn):
            continue
        working[name] = fn
    return working


def pick(seconds: dict[str, float], reference: str, margin: float = MARGIN) -> str:
    """The fastest candidate, or `reference` unless that one is more than `margin` faster."""
    best = min(seconds, key=seconds.get)
    return best if seconds[best] < seconds[reference] * (1 - margin) else reference


def fastest(
    key: str,
    candidates: dict[str, Callable[[], object]],
    reference: str,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> str:
    """The name of the fastest of `candidates` (callables doing the same work different ways) for `key`,
    a description of the work (op, shapes, dtype) unique among choices. Measured once per process, or read
    from disk where an earlier process measured it (a stored choice is called once, and used only if it is
    among `candidates` and that call succeeds); `reference` when tuning is off or only it is offered.
    `clock` gives seconds, for the timing and for deciding whether it cost enough to be written to disk.

    Raises ValueError when `reference` is not among `candidates`; whatever the reference's call raises."""
    if reference not in candidates:
        raise ValueError(f"reference {reference!r} is not among the candidates {sorted(candidates)}")
    if not enabled() or len(candidates) == 1:
        return reference
    machine = machine_key(device)
    full = f"{machine}|{key}"
    if full in _CHOICES:
        return _CHOICES[full]
    stored = _stored_choice(machine, key)
    if stored in candidates and (stored == reference or _works(candidates[stored])):
        _CHOICES[full] = stored
        return stored
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    start = clock()
    seconds = time_candidates(_working(candidates, reference), repeats, sync, warm=False, clock=clock)
    choice = pick(seconds, reference)
    _CHOICES[full] = choice
    cost = clock() - start
    if cost > PERSIST_AFTER_S:
        _write_disk(machine, key, {"choice": choice, "seconds": seconds, "measured_in_s": round(cost, 3)})
    return choice


def choices() -> dict[str, str]:
    """What this process chose so far (full key -> name): the bench records it."""
    return dict(_CHOICES)


def forget() -> None:
    """Drop this process's choices and its parse of the file (the file stays): the next `fastest` reads the
    file again, or measures, as a new process would."""
    global _DISK
    _CHOICES.clear()
    _DISK = None
