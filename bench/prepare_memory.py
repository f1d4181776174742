"""Peak memory and throughput of `python -m smollm_ref.data prepare`: runs the command and samples the
memory of it and all its worker processes together (PSS and RSS, from /proc) every 0.1 s.

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


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of `pid` and every descendant. RSS counts a shared page (the torch and tokenizers
    libraries every worker maps) once per process; PSS divides it among them, so its sum is what the tree
    really holds."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in rollup.splitlines()[1:] if line.endswith("kB")}
        rss, pss = rss + fields.get("Rss", 0), pss + fields.get("Pss", 0)
    return rss, pss


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
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = tree_memory(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    out = proc.stdout.read()
    result = {
        "command": " ".join(command),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "seconds": round(seconds, 1),
        "peak_pss_mib": round(peak_pss / 2**20),
        "peak_rss_sum_mib": round(peak_rss / 2**20),
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
