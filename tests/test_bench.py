"""bench/throughput.py end to end on the tiny preset: the table, the JSON, the default plan, bad options.
(Speed is never asserted here: the figures are the benchmark's to report.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import throughput as bench
from smollm_ref import metrics

REPO = Path(__file__).resolve().parent.parent

TINY = ["--config", "smollm2-tiny", "--batch-size", "2", "--seq-len", "16", "--new-tokens", "4", "--prompt-len", "4",
        "--repeats", "1", "--peers", "transformers"]  # fmt: skip


def test_default_plan_writes_every_figure_with_ratios(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main([*TINY, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    runs = {(r["task"], r["mode"]): r for r in results["runs"]}
    # without --modes: forward float32, train bf16, decode float32 at 1 and 8 and bf16 at 1, memory bf16
    assert set(runs) == {("forward", "float32"), ("train", "bf16"), ("decode b1", "float32"), ("decode b8", "float32"),
                         ("decode b1", "bf16"), ("memory", "bf16")}  # fmt: skip
    for key, run in runs.items():
        assert "error" not in run, (key, run)
        ours = run["sides"]["smollm_ref"]
        if key[0] == "memory":
            assert ours["peak_bytes"] > 0 and 0 < ours["peak_ratio_vs_transformers"] < 10
        else:
            assert ours["ratio_vs_transformers"]["median"] > 0 and run["sides"]["transformers"]["tokens_per_s"]["median"] > 0
    assert runs[("decode b1", "float32")]["sides"]["smollm_ref"]["same_tokens_as_transformers"] is True
    assert results["env"]["torch"] and results["env"]["transformers"] and results["env"]["cpu_count"]
    table = capsys.readouterr().out
    assert "| decode b8 | float32 | smollm_ref |" in table and "peak memory" in table


@pytest.mark.parametrize(
    "args, message",
    [(["--modes", "fp8"], "--modes"), (["--tasks", "sing"], "--tasks"), (["--decode-batch-sizes", "1,x"], "--decode-batch-sizes"),
     (["--repeats", "0"], "--repeats"), (["--config", "no-such-preset"], "--config")],
)  # fmt: skip
def test_bad_options_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_mfu_peak_comes_from_the_metrics_table(monkeypatch):
    assert not hasattr(bench, "PEAK_BF16") and not hasattr(bench, "flops_per_token")  # one table, one formula
    assert bench.peak_flops(torch.device("cpu")) == (None, None)
    monkeypatch.setattr(metrics, "device_name", lambda device: "NVIDIA H100 PCIe")
    label, peak = bench.peak_flops(torch.device("cuda"))
    assert peak == metrics.peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12 and "H100 PCIe" in label
    monkeypatch.setattr(metrics, "device_name", lambda device: "NVIDIA L40S")
    assert bench.peak_flops(torch.device("cuda")) == ("NVIDIA L40S: peak unknown, no MFU", None)


@pytest.mark.parametrize("pythonpath", [True, False])
def test_runs_as_a_script_from_the_repository_root(pythonpath):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | ({"PYTHONPATH": "."} if pythonpath else {})
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--help"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python bench/throughput.py")
