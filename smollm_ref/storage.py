"""Files and the machine they live on: writing files that must survive a full disk or a killed process
(recognising "no space left" however it is wrapped, saying it in one sentence, sweeping the temporaries of
writers that are gone); reading the small files the code trusts (configs, recipes, indexes, caches) with a
size limit, regular files only; the cache directory; a file's SHA-256; the memory this process has left."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import BinaryIO


class DiskFull(OSError):
    """No space left while writing; the message says where, how much is free and how much was needed."""


# torch.save reports ENOSPC from its zip writer as "[enforce fail at inline_container.cc:...] . unexpected pos"
_WRAPPED = ("unexpected pos", "no space left", "file write failed", "enospc")


def is_disk_full(exc: BaseException, directory: Path | None = None, needed: int = 0) -> bool:
    """True for ENOSPC/EDQUOT, and for the torch/safetensors errors that wrap it when `directory` is short
    of `needed` bytes (their messages keep no errno)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    if any(marker in text for marker in _WRAPPED):
        return True
    return directory is not None and needed > 0 and free_bytes(directory) < needed


def free_bytes(directory: Path) -> int:
    """Free bytes on the file system holding `directory` (or its nearest existing parent)."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size(nbytes: float) -> str:
    """A size for a message, in decimal units: '1.23 GB' from 0.1 GB up, else '56.7 MB'."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def disk_full_error(directory: Path, what: str, needed: int) -> DiskFull:
    return DiskFull(
        errno.ENOSPC,
        f"no space left on the device holding {directory} while writing {what}; {size(free_bytes(directory))} free, "
        f"it needs about {size(needed)}",
    )


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_PID = re.compile(r"(?:\.tmp|-)(\d+)$")


def sweep_stale(directory: Path, prefix: str = "", suffix_pattern: str = ".tmp", all_dead: bool = False) -> list[Path]:
    """Remove the temporaries in `directory` that a writer left behind: names containing `suffix_pattern`
    (and starting with `prefix`) whose trailing pid is not a live process; with `all_dead=True` (the caller
    holds the directory's lock, so no other writer exists) every such name. Returns what was removed."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for path in Path(directory).iterdir():
        if not path.name.startswith(prefix) or suffix_pattern not in path.name:
            continue
        match = _PID.search(path.name)
        if not all_dead and (match is None or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1)))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class DirectoryLock:
    """An exclusive `flock` on DIR/.lock: one writer per directory. The kernel releases it when the process
    dies, so a SIGKILL never leaves a stale lock; the file keeps the holder's pid for the error message."""

    NAME = ".lock"

    def __init__(self, directory: Path):
        self.path = Path(directory) / self.NAME
        self.fd: int | None = None

    def acquire(self, wait: bool = False) -> DirectoryLock:
        """Take the lock; held by another process: `LockedError` naming its pid, or with `wait` block until
        it is released."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = self.holder(fd)
            os.close(fd)
            raise LockedError(f"{self.path.parent} is in use by another process (pid {holder})") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    @staticmethod
    def holder(fd: int) -> str:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


class LockedError(RuntimeError):
    """Another live process holds the directory's lock."""


SMALL_FILE_LIMIT = 16 * 2**20  # configs, recipes, manifests, indexes, progress and tuning files are kilobytes


class BadFile(ValueError):
    """A small file the code reads (config, recipe, index, manifest, cache) that is not what it must be:
    not a regular file, too large, not UTF-8 or not JSON. The message is one line naming the file."""


def open_regular(path: Path | str, what: str = "file", hint: str = "give the path of a regular file"):
    """`path` opened for binary reading, refused unless it is a regular file (checked on the open descriptor,
    so a rename in between cannot swap it): opening a FIFO for reading would block until a writer comes,
    `/dev/zero` never ends, a directory reads as an error naming neither file nor line.

    Raises `FileNotFoundError` when absent, `BadFile` "{what} {path} is not a regular file; {hint}"."""
    # O_NONBLOCK: opening a FIFO with no writer returns at once instead of hanging; it is refused just below.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadFile(f"{what} {path} is not a regular file; {hint}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small_text(path: Path | str, what: str = "file", limit: int = SMALL_FILE_LIMIT) -> str:
    """The text of a small regular file, read at most `limit` bytes. A FIFO, device or directory is refused
    without reading (`open_regular`).

    Raises `FileNotFoundError` when absent, `BadFile` for anything else wrong."""
    path = Path(path)
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise BadFile(f"{what} {path} is {size:,} bytes, more than the {limit:,} bytes such a file can be")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BadFile(f"{what} {path} is more than the {limit:,} bytes such a file can be")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFile(f"{what} {path} is not UTF-8 text (byte {e.start}); give a UTF-8 file") from None


def loads_json(text: str, where: str):
    """`json.loads` whose every failure is one `BadFile` line naming `where` (a path, or path:line): syntax
    errors, nesting deeper than Python's recursion limit (a RecursionError otherwise) and integers of more digits
    than Python converts (a ValueError naming neither)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadFile(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise BadFile(f"{where} nests JSON too deeply to read") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise BadFile(f"{where} holds a number too long to read") from None


def is_int(value) -> bool:
    """An integer as JSON and Python callers give one: a bool is not one (`True` is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, not a bool (its finiteness is the caller's to check)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value, limit: int = 60, quote: bool = True) -> str:
    """A value read from a file or sent by a caller, for a one-line error: its repr (its str with
    `quote=False`), cut to about `limit` characters (a field can be any size)."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_small_json(path: Path | str, what: str = "file", limit: int = SMALL_FILE_LIMIT):
    """`read_small_text` + `loads_json`: the parsed JSON value of a small regular file (any type; callers
    check the type they need)."""
    return loads_json(read_small_text(path, what, limit), f"{what} {path}")


def follow_umask(path: Path | str) -> None:
    """Give `path` the mode the umask gives a new file. safetensors (0.8) writes a private temporary file (mode
    0600) and renames it into place; every other file the package writes follows the umask, so whoever may read
    the directory may read the weights too."""
    umask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def cache_dir() -> Path:
    """Where downloads and derived files go: $SMOLLM_REF_CACHE, else ~/.cache/smollm_ref."""
    return Path(os.environ.get("SMOLLM_REF_CACHE", Path.home() / ".cache" / "smollm_ref"))


def sha256_file(file: Path | str | BinaryIO, limit: int | None = None) -> str:
    """The SHA-256 of a file's bytes as 64 hex digits, read 1 MiB at a time. `file` is a path (opened here)
    or a file open for binary reading (read from where it stands, left open: a caller that checked what it
    opened hashes that same file). With `limit`, at most that many bytes are read: the size the caller
    checked, however much a writer appends meanwhile."""
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return sha256_file(f, limit)
    h = hashlib.sha256()
    left = limit
    while left is None or left > 0:
        chunk = file.read(1 << 20 if left is None else min(left, 1 << 20))
        if not chunk:
            break
        h.update(chunk)
        if left is not None:
            left -= len(chunk)
    return h.hexdigest()


def available_memory() -> int | None:
    """Bytes this process can still allocate, as far as the system says: the least of /proc/meminfo's
    MemAvailable, the cgroup's memory.max less its use, and RLIMIT_AS less this process's address space."""
    limits = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
        limits += [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        try:
            limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            status = Path("/proc/self/status").read_text()
            used = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:")), 0)
            limits.append(soft - used)
    except (ImportError, OSError, ValueError):
        pass
    return max(0, min(limits)) if limits else None
