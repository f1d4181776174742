#!/usr/bin/env bash
# The bench's train and forward figures before and after issue 18 item 22 (the same work on every side), in
# one session: the old bench (commit $OLD, exported with git archive, no worktree) and this one run in turn,
# RUNS times (old, new, old, new, ...), so that a machine whose speed drifts slows both alike; every run's
# JSON is kept under $OUT, then both are summarised as medians over runs.
#   bash bench/before_after.sh                      (from the repository root; RUNS=1 for a first look)
#   EXTRA_PYTHONPATH=../litdeps bash bench/before_after.sh      (with litgpt installed as the README says)
# Cost: each run of each bench is forward and train in float32 and bf16 at 4 x 512 on the 135M config: on 2
# CPU cores about 5-8 minutes (the float32 train step alone is 10-20 s a side).
set -eu
OLD=${OLD:-69799eb}
RUNS=${RUNS:-3}
OUT=$(realpath -m "${OUT:-bench/results/before-after}")
ARGS=${ARGS:---tasks forward,train --modes float32,bf16 --repeats 3 --peers transformers,litgpt}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA_PYTHONPATH:+:$(realpath -m "$EXTRA_PYTHONPATH")}
OLD_TREE=$(mktemp -d)
trap 'rm -rf "$OLD_TREE"' EXIT
git archive "$OLD" | tar -x -C "$OLD_TREE"
mkdir -p "$OUT"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
for i in $(seq "$RUNS"); do
  echo "run $i of $RUNS: old ($OLD)" >&2
  (cd "$OLD_TREE" && PYTHONPATH=.$EXTRA $PYTHON bench/throughput.py $ARGS --json "$OUT/old.run$i.json" > "$OUT/old.run$i.txt")
  echo "run $i of $RUNS: new ($(git rev-parse --short HEAD))" >&2
  PYTHONPATH=.$EXTRA $PYTHON bench/throughput.py $ARGS --json "$OUT/new.run$i.json" > "$OUT/new.run$i.txt"
done
PYTHONPATH=. $PYTHON - "$OUT" "$RUNS" <<'EOF'
import sys
from pathlib import Path

from bench.throughput import over_runs, print_over_runs
from smollm_ref.storage import read_small_json

out, runs = Path(sys.argv[1]), int(sys.argv[2])
for side in ("old", "new"):
    every = [read_small_json(out / f"{side}.run{i}.json", "bench results") for i in range(1, runs + 1)]
    print(f"\n{side}: {every[0]['env']['device']}, {every[0]['env']['cpu_count']} CPUs, torch {every[0]['env']['torch']}")
    print_over_runs(over_runs(every), runs)
EOF
