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

from bench import ceilings
from bench import throughput as bench
from smollm_ref import metrics
from smollm_ref.config import ModelConfig
from smollm_ref.model import LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent

TINY = ["--config", "smollm2-tiny", "--batch-size", "2", "--seq-len", "16", "--new-tokens", "4", "--prompt-len", "4",
        "--repeats", "1", "--peers", "transformers"]  # fmt: skip


def test_default_plan_writes_every_figure_with_ratios(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main([*TINY, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    runs = {(r["task"], r["mode"]): r for r in results["runs"]}
    # Without --modes: forward float32, decode float32 and bf16 at batch 1; train and memory in bf16 where this
    # machine's bf16 GEMMs are at least as fast as its float32 ones, else in float32.
    limits = results["ceilings"]
    train = "bf16" if results["plan"] == "train and memory in bf16" else "float32"
    assert results["plan"].startswith(f"train and memory in {train}")
    assert set(runs) == {("forward", "float32"), ("train", train), ("decode b1", "float32"), ("decode b1", "bf16"),
                         ("memory", train)}  # fmt: skip
    for key, run in runs.items():
        assert "error" not in run, (key, run)
        ours = run["sides"]["smollm_ref"]
        if key[0] == "memory":
            assert ours["peak_bytes"] > 0 and 0 < ours["peak_ratio_vs_transformers"] < 10
        else:
            assert ours["ratio_vs_transformers"]["median"] > 0 and run["sides"]["transformers"]["tokens_per_s"]["median"] > 0
            for side in run["sides"].values():  # every figure also as a share of this machine's ceiling
                assert 0 < side["ceiling_share"] < 10
    assert {"gemm forward float32", f"gemm train {'bfloat16' if train == 'bf16' else 'float32'}"} <= set(limits)
    assert {"bandwidth float32", "bandwidth bfloat16"} <= set(limits)
    assert limits["bandwidth float32"]["stream_read_bytes_per_s"] == limits["bandwidth bfloat16"]["stream_read_bytes_per_s"]
    assert results["env"]["cpu"]["model"] and isinstance(results["env"]["cpu"]["flags"], list)
    assert runs[("decode b1", "float32")]["sides"]["smollm_ref"]["same_tokens_as_transformers"] is True
    assert results["env"]["torch"] and results["env"]["transformers"] and results["env"]["cpu_count"]
    table = capsys.readouterr().out
    assert "| decode b1 | float32 | smollm_ref |" in table and "peak memory" in table
    assert "share of ceiling" in table and "ceiling bandwidth float32" in table and results["env"]["cpu"]["model"] in table


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("rows", [32, 2048, 5000])
def test_ceiling_gemms_add_up_to_the_model_flops(train, rows):
    """The GEMMs the ceiling times, at their counts, are the step's own: 2 FLOPs per weight per row in the
    forward, three times that in training (lm_head counted once whether tied or not, as in metrics)."""
    config = ModelConfig.from_name("smollm2-135m")
    total = sum(g.count * g.flops for g in ceilings.model_gemms(config, rows, train))
    weights = metrics.matmul_params(config) - config.hidden_size * (2 * config.num_hidden_layers + 1)  # less the norms
    assert total == pytest.approx(2 * weights * rows * (3 if train else 1), rel=1e-12)


def test_shares_of_ceilings_are_figure_over_ceiling():
    config = ModelConfig.from_name("smollm2-135m")
    band = {"weight_bytes_per_step": 500e6, "bytes_per_s": 20e9}
    assert ceilings.decode_share(40.0, 1, band) == pytest.approx(1.0)  # 40 tok/s x 500 MB = 20 GB/s
    assert ceilings.decode_share(80.0, 8, band) == pytest.approx(0.25)  # one read of the weights serves 8 tokens
    gemm = {"flops_per_s": metrics.flops_per_token(config, 512) * 100.0, "train": True}
    assert ceilings.flops_share(50.0, config, 512, gemm) == pytest.approx(0.5)
    assert ceilings.flops_share(150.0, config, 512, {**gemm, "train": False}) == pytest.approx(0.5)  # forward: 1/3 the FLOPs


def test_cpu_info_names_the_processor_and_its_matmul_flags():
    info = ceilings.cpu_info()
    assert info["model"] and set(info["flags"]) <= set(ceilings.CPU_FLAGS)
    assert info["bf16_in_hardware"] == bool({"avx512_bf16", "amx_bf16"} & set(info["flags"]))


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


@pytest.mark.parametrize("speedup, train", [(0.25, "float32"), (1.0, "bf16"), (2.5, "bf16")])
def test_default_plan_trains_in_bf16_only_where_bf16_is_not_slower(speedup, train, monkeypatch):
    monkeypatch.setattr(ceilings.Ceilings, "bf16_speedup", lambda self: speedup)
    config = ModelConfig.from_name("smollm2-tiny")
    limits = ceilings.Ceilings(config, 32, 16, LlamaForCausalLM(config))
    plan, note = bench.default_plan(["forward", "train", "decode", "memory"], limits)
    assert sorted((t, m.name) for m, t in plan) == sorted(
        [("forward", "float32"), ("decode", "float32"), ("decode", "bf16"), ("train", train), ("memory", train)]
    )
    assert note.startswith(f"train and memory in {train}")


def test_bf16_speedup_probe_is_a_positive_ratio():
    config = ModelConfig.from_name("smollm2-tiny")
    assert 0 < ceilings.Ceilings(config, 32, 16, LlamaForCausalLM(config)).bf16_speedup() < 100


@pytest.mark.parametrize("task", ["forward", "train", "decode"])
def test_profile_splits_a_call_by_kind_of_op(task, tmp_path):
    from bench import op_profile as profile

    out = tmp_path / "p.json"
    args = ["--task", task, "--config", "smollm2-tiny", "--batch-size", "2", "--seq-len", "16", "--new-tokens", "3"]
    assert profile.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    kinds = result["by_kind_s"]
    assert kinds["matmul"] > 0 and result["op_calls"] > 0 and set(kinds) <= {"matmul", "attention", "optimizer", "other"}
    assert ("optimizer" in kinds) == (task == "train")
    assert profile.kind_of("aten::mm") == "matmul" and profile.kind_of("aten::add") == "other"


@pytest.mark.parametrize("args, message", [(["--seq-len", "0"], "--seq-len"), (["--config", "nope"], "--config")])
def test_profile_refuses_bad_options_in_one_line(args, message, capsys):
    from bench import op_profile

    with pytest.raises(SystemExit) as e:
        op_profile.main(["--task", "forward", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_each_round_is_held_against_the_ceiling_measured_beside_it():
    """A machine that slows down mid-run slows the ceiling's probes too: round i gets the larger of the probes
    before and after it, and a side's share is the median of its per-round shares."""
    probes = iter([100.0, 50.0, 80.0, 60.0])  # before round 1, after rounds 1, 2, 3
    started, stopped = [], []
    probe = (lambda: started.append(1), lambda: next(probes), lambda: stopped.append(1))
    res = bench.interleave({"a": (lambda: None, 10)}, 3, torch.device("cpu"), lambda: None, probe)
    assert res["a"]["_ceilings"] == [100.0, 80.0, 80.0] and started == stopped == [1]

    class Limits:
        def share(self, task, dtype, tokens_per_s, batch, ceiling):
            return tokens_per_s / ceiling

    res["a"]["_raw"] = [0.5, 0.25, 0.125]  # 20, 40, 80 tokens/s for 10 tokens a call
    bench.add_shares(res, Limits(), "forward", bench.Mode("float32"), 10)
    assert res["a"]["ceiling_shares"] == [0.2, 0.5, 1.0] and res["a"]["ceiling_share"] == 0.5
