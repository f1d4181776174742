"""Peak memory and throughput of `python -m smollm_ref.data prepare`: runs the command and samples the
resident memory of it and all its worker processes together (from /proc) every 0.1 s.

    python bench/prepare_memory.py --json out.json -- prepare CORPUS --out DIR --workers 2 --no-progress
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and every descendant."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        ppid = int(fields.get("PPid", "0").strip())
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="append the result to this JSON-lines file")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the arguments of python -m smollm_ref.data")
    args = parser.parse_args()
    command = [sys.executable, "-m", "smollm_ref.data", *[a for a in args.args if a != "--"]]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    out = proc.stdout.read()
    result = {
        "command": " ".join(command),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(peak / 2**20),
        "returncode": proc.returncode,
        "output": out.strip(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
