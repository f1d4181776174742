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

from bench import ceilings, step_memory
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
                assert side["ceiling_share"] > 0 and side["above_ceiling"] == (side["ceiling_share"] > 1)
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


def test_bf16_speedup_is_float32_time_over_bf16_time_at_the_mlp_shape(monkeypatch):
    """What the probe computes, not how fast the machine is: the timing is stubbed (the test it replaces
    asserted a measured ratio between 0 and 100 and failed once on a loaded machine)."""
    config = ModelConfig.from_name("smollm2-tiny")
    seen = []

    def fastest(gemms, dtype, device, repeats):
        seen.append((gemms[0].m, gemms[0].k, gemms[0].n, dtype))
        return [("stub", {torch.float32: 3.0, torch.bfloat16: 0.75}[dtype], {})]

    monkeypatch.setattr(ceilings, "fastest_gemms", fastest)
    assert ceilings.Ceilings(config, 32, 16, LlamaForCausalLM(config)).bf16_speedup() == 4.0
    shape = (32, config.hidden_size, config.intermediate_size)
    assert seen == [(*shape, torch.float32), (*shape, torch.bfloat16)]


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
    res = bench.interleave({"a": bench.Side(lambda: None, 10)}, 3, torch.device("cpu"), lambda: None, probe)
    assert res["a"]["_ceilings"] == [100.0, 80.0, 80.0] and started == stopped == [1]

    class Limits:
        def share(self, task, dtype, tokens_per_s, batch, ceiling):
            return tokens_per_s / ceiling

    res["a"]["_raw"] = [0.5, 0.25, 0.125]  # 20, 40, 80 tokens/s for 10 tokens a call
    bench.add_shares(res, Limits(), "forward", bench.Mode("float32"), 10)
    assert res["a"]["ceiling_shares"] == [0.2, 0.5, 1.0] and res["a"]["ceiling_share"] == 0.5


def _stub_timing(monkeypatch, seconds_of):
    """Replaces the candidates' timing with seconds_of(implementation) for each callable by what it is (each
    implementation tagged where `gemm_candidates` makes it, so a caller that times another callable under a
    name is caught), each still called once by `best_seconds`, so a failing one is left out as in a real
    run. Returns the (key, implementation) pairs that were timed."""
    timed = []
    real = ceilings.gemm_candidates

    def tagged(g, dtype, device):
        out = real(g, dtype, device)
        for name, fn in out.items():
            fn.implementation = name
        return out

    def time_candidates(candidates, repeats=5, sync=None, warm=True):
        timed.extend((key, fn.implementation) for key, fn in candidates.items())
        return {key: seconds_of(fn.implementation) for key, fn in candidates.items()}

    monkeypatch.setattr(ceilings, "gemm_candidates", tagged)
    monkeypatch.setattr(ceilings.tuning, "time_candidates", time_candidates)
    return timed


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_gemm_ceiling_takes_each_shape_at_its_fastest_implementation(rank, monkeypatch):
    """Each implementation gets its own distinct time, in three orders (the fastest being a different one
    each time), so the stub cannot pick the answer: the ceiling must time every implementation available
    and take the fastest for every shape; a figure's share is then against that."""
    config = ModelConfig.from_name("smollm2-tiny")
    names = list(ceilings.gemm_candidates(ceilings.model_gemms(config, 32, True)[0], torch.float32, "cpu"))
    expected = {"mm a row-major, b row-major", "mm a row-major, b column-major", "mm a column-major, b row-major",
                "mm a column-major, b column-major", "F.linear"}  # fmt: skip
    if bench_onednn():
        expected.add("oneDNN packed linear")
    assert set(names) == expected
    order = names[rank:] + names[:rank]  # order[0] is the fastest: 1 ms, then 2, 3, ...
    seconds_of = {name: 1e-3 * (i + 1) for i, name in enumerate(order)}.__getitem__
    timed = _stub_timing(monkeypatch, seconds_of)
    gemms = ceilings.model_gemms(config, 32, True)
    c = ceilings.gemm_ceiling(config, 32, torch.float32, "cpu", True)
    assert sorted(timed) == sorted(((i, name), name) for i in range(len(gemms)) for name in expected)  # all, every shape
    assert [p["fastest"] for p in c["parts"]] == [order[0]] * len(gemms)
    assert c["flops_per_s"] == pytest.approx(sum(g.count * g.flops for g in gemms) / sum(g.count * 1e-3 for g in gemms))
    assert all(p["gflops_each"][order[-1]] == pytest.approx(g.flops / (1e-3 * len(order)) / 1e9, abs=0.05)
               for p, g in zip(c["parts"], gemms))  # fmt: skip
    limits = ceilings.Ceilings(config, 32, 16, LlamaForCausalLM(config))
    rate = c["flops_per_s"] / (metrics.flops_per_token(config, 16))  # tokens/s that reach the ceiling exactly
    assert limits.share("train", torch.float32, rate) == pytest.approx(1.0)
    assert limits.share("train", torch.float32, rate / 4) == pytest.approx(0.25)


def bench_onednn() -> bool:
    from smollm_ref.fast.packing import onednn_available

    return onednn_available("cpu")


def test_an_implementation_that_fails_is_left_out_and_the_rest_still_count(monkeypatch):
    config = ModelConfig.from_name("smollm2-tiny")
    real = ceilings.gemm_candidates

    def candidates(g, dtype, device):
        out = real(g, dtype, device)
        out["broken"] = lambda: (_ for _ in ()).throw(RuntimeError("no kernel for this dtype"))
        return out

    monkeypatch.setattr(ceilings, "gemm_candidates", candidates)
    timed = _stub_timing(monkeypatch, lambda name: 1e-3)  # tags what `candidates` returns, "broken" included
    c = ceilings.gemm_ceiling(config, 32, torch.float32, "cpu", False)
    assert timed and all(name != "broken" for _, name in timed)
    assert {name for _, name in timed} == set(real(ceilings.model_gemms(config, 32, False)[0], torch.float32, "cpu"))
    assert all("broken" not in p["gflops_each"] for p in c["parts"])


def test_probes_retime_each_gemm_in_the_implementation_the_ceiling_found_fastest(monkeypatch):
    config = ModelConfig.from_name("smollm2-tiny")
    timed = _stub_timing(monkeypatch, lambda name: 1e-3 if name == "F.linear" else 2e-3)
    limits = ceilings.Ceilings(config, 32, 16, LlamaForCausalLM(config))
    start, measure, stop = limits.probe("forward", torch.float32)
    timed.clear()
    start()
    assert measure() == pytest.approx(limits.gemm(torch.float32, train=False)["flops_per_s"])
    stop()
    assert {name for _, name in timed} == {"F.linear"} and len(timed) == len(ceilings.model_gemms(config, 32, False))


AVX512_BF16 = "model name\t: AMD EPYC 9R45\ncpu MHz\t\t: 2450.000\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16\n"
XEON = "model name\t: Intel(R) Xeon(R) Platinum 8488C @ 2.50GHz\ncpu MHz\t\t: 2000.000\nflags\t\t: sse2 avx avx2 fma avx512f amx_bf16\n"
AVX2 = "model name\t: Some CPU\ncpu MHz\t\t: 3000.000\nflags\t\t: sse2 avx avx2 fma\n"


@pytest.mark.parametrize(
    "cpuinfo, cpus, fp32, bf16",
    [(AVX512_BF16, 2, 2 * 2.45e9 * 2 * 16 * 2, 2 * 2.45e9 * 2 * 16 * 2 * 2),  # 2 FMA units x 16 lanes x 2 FLOPs; bf16 twice
     (XEON, 4, 4 * 2.5e9 * 64, 4 * 2.5e9 * 1024),  # clock: the model name's 2.50GHz beats cpu MHz; AMX 1024/cycle
     (AVX2, 1, 3e9 * 2 * 8 * 2, 3e9 * 2 * 8 * 2)],  # no bf16 in hardware: float32's rate
)  # fmt: skip
def test_peak_fma_is_cpus_x_clock_x_fma_units_x_lanes(cpuinfo, cpus, fp32, bf16):
    peak = ceilings.peak_fma(cpuinfo, cpus)
    assert peak["float32"] == pytest.approx(fp32) and peak["bfloat16"] == pytest.approx(bf16)
    assert peak["derivation"].startswith("theoretical peak") and f"{cpus} CPUs" in peak["derivation"]
    assert ceilings.clock_implied_by(2 * fp32, peak, "float32") == pytest.approx(2 * peak["clock_hz"])
    assert ceilings.peak_fma("model name\t: x\n", 2)["float32"] is None


def test_gemm_ceiling_is_reported_beside_the_theoretical_peak(monkeypatch):
    config = ModelConfig.from_name("smollm2-tiny")
    _stub_timing(monkeypatch, lambda name: 1e-3)
    real = ceilings.peak_fma
    monkeypatch.setattr(ceilings, "peak_fma", lambda: real(AVX512_BF16, 2))
    limits = ceilings.Ceilings(config, 32, 16, LlamaForCausalLM(config))
    c = limits.gemm(torch.float32, train=False)
    assert limits.measured["peak fma"]["float32"] == c["theoretical_peak_flops_per_s"] == pytest.approx(313.6e9)
    assert c["share_of_theoretical_peak"] == pytest.approx(c["flops_per_s"] / 313.6e9)


def test_a_figure_above_its_ceiling_is_said_loudly_not_printed_as_a_share(capsys):
    class Limits:
        def share(self, task, dtype, tokens_per_s, batch, ceiling):
            return tokens_per_s / ceiling

    res = {"smollm_ref": {"_raw": [0.1, 0.1], "_ceilings": [50.0, 50.0]}, "transformers": {"_raw": [1.0], "_ceilings": [50.0]}}
    bench.add_shares(res, Limits(), "forward", bench.Mode("float32"), 10)  # 100 tok/s against 50: 2x
    assert res["smollm_ref"]["above_ceiling"] is True and res["smollm_ref"]["ceiling_share"] == 2.0
    assert res["transformers"]["above_ceiling"] is False
    side = {**res["smollm_ref"], "tokens_per_s": bench.summary([100.0]), "seconds": bench.summary([0.1]), "warmup_s": 0.1}
    results = {"env": {"device": "cpu", "device_type": "cpu", "cpu_count": 2, "torch": "t", "transformers": "t"},
               "runs": [{"task": "forward", "mode": "float32", "sides": {"smollm_ref": side}}]}  # fmt: skip
    bench.print_table(results)
    out, err = capsys.readouterr()
    assert "200%" not in out and "ABOVE the measured ceiling (2.00x)" in out
    assert "WARNING: a figure above its measured ceiling, forward float32 smollm_ref: 2.00x" in err


def _tiny_models(peers=("transformers",)):
    config = ModelConfig.from_name("smollm2-tiny")
    return config, bench.build_models(config, torch.device("cpu"), 0, list(peers))


@pytest.mark.parametrize("mode", ["float32", "bf16"])
def test_every_side_trains_with_the_same_optimizer(mode, monkeypatch):
    """Every AdamW the training figures build is the trainer's (`train.optim.adamw`: fused where the device
    has it), one per side, the same on every side (the peers once had the unfused default: 5x slower)."""
    expected = train_module().adamw([torch.nn.Parameter(torch.zeros(2))], lr=1e-5).defaults  # the trainer's
    built = []
    init = torch.optim.AdamW.__init__

    def record(self, params, *args, **kwargs):
        init(self, params, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", record)
    config, models = _tiny_models()
    ids = torch.randint(0, config.vocab_size, (2, 8))
    sides = bench.train_fns(models, bench.Mode(mode), ids, torch.device("cpu"))
    assert len(built) == len(models) == len(sides)
    for opt in built:
        assert type(opt) is torch.optim.AdamW
        assert {k: opt.defaults[k] for k in ("fused", "foreach")} == {k: expected[k] for k in ("fused", "foreach")}
    owners = {id(p): name for name, m in models.items() for p in m.parameters()}
    assert sorted(owners[id(o.param_groups[0]["params"][0])] for o in built) == sorted(models)


def train_module():
    from smollm_ref import train

    return train


@pytest.mark.parametrize("mode, expected", [("float32", "reference"), ("bf16", "fast")])
def test_train_figure_times_the_step_the_trainer_runs_in_that_mode(mode, expected, monkeypatch):
    """In float32 the trainer trains the reference model (`train.step.fast_forward` is None for fp32); in
    bf16 its fast step. The bench's smollm_ref side must time that step, through the trainer's `train_step`."""
    from smollm_ref.fast import FastForward
    from smollm_ref.model import LlamaForCausalLM as Reference

    calls = []
    for name in ("loss", "lm_loss"):
        real = getattr(FastForward, name)
        monkeypatch.setattr(
            FastForward, name, lambda self, *a, real=real, name=name: calls.append(f"fast {name}") or real(self, *a)
        )
    real_forward = Reference.forward
    monkeypatch.setattr(Reference, "forward", lambda self, *a, **k: calls.append("reference") or real_forward(self, *a, **k))
    real_step = train_module().train_step
    monkeypatch.setattr(bench, "train_step", lambda *a, **k: calls.append("train_step") or real_step(*a, **k), raising=False)
    config, models = _tiny_models(peers=())
    ids = torch.randint(0, config.vocab_size, (2, 8))
    side = bench.train_fns(models, bench.Mode(mode), ids, torch.device("cpu"))["smollm_ref"]
    fast, _ = train_module().step.fast_forward(
        models["smollm_ref"], bench.trainer_config(bench.Mode(mode)).model, 1, bench.Mode(mode).precision
    )
    trainer_uses_fast = fast is not None
    assert trainer_uses_fast == (expected == "fast") and side.step == expected
    side.fn()
    assert calls == ["train_step", "fast lm_loss" if expected == "fast" else "reference"]


def test_side_order_rotates_every_round():
    calls = []
    sides = {name: bench.Side(lambda name=name: calls.append(name), 1) for name in "abc"}
    bench.interleave(sides, 4, torch.device("cpu"), lambda: None)
    assert calls == list("abc") + list("abcbcacababc")  # warm-ups, then rounds 1-4


def test_bf16_forward_runs_every_side_on_weights_cast_once_outside_the_timing(monkeypatch):
    """No side recasts weights inside the timed call (autocast did, for the peers only): every side gets a
    bf16 copy made before the timing, and none runs under autocast."""
    from smollm_ref.fast import FastForward

    seen = []
    real_init = FastForward.__init__

    def init(self, model, *a, **k):
        seen.append(("smollm_ref", model.lm_head.weight.dtype, False))
        real_init(self, model, *a, **k)

    monkeypatch.setattr(FastForward, "__init__", init)
    config, models = _tiny_models()
    models["transformers"].register_forward_pre_hook(
        lambda m, args: seen.append(("transformers", m.lm_head.weight.dtype, torch.is_autocast_enabled("cpu")))
    )
    captured = {}
    real_fns = bench.forward_fns

    def forward_fns(models_, mode, ids, device):
        captured.update(models_)
        sides = real_fns(models_, mode, ids, device)
        for side in sides.values():
            side.fn()
        return sides

    monkeypatch.setattr(bench, "forward_fns", forward_fns)

    class Limits:
        def probe(self, task, dtype):
            return (lambda: None), (lambda: 1.0), (lambda: None)

        def share(self, *a):
            return 0.5

    args = bench.parse_args([*TINY])
    ids = torch.randint(0, config.vocab_size, (2, 8))
    results = {"runs": []}
    run = bench.Run(args, config, torch.device("cpu"), models, ids, results, type("Bar", (), {"set_postfix_str": lambda s, x: None, "update": lambda s, n: None})(), 1, None, {}, Limits())  # fmt: skip
    bench.run_task("forward", bench.Mode("bf16"), run)
    assert sorted(set(seen)) == [("smollm_ref", torch.bfloat16, False), ("transformers", torch.bfloat16, False)]
    assert all(p.dtype == torch.float32 for m in models.values() for p in m.parameters())  # the originals untouched
    assert all(captured[name] is not models[name] for name in models)
    assert "outside the timing" in results["runs"][0]["weights"]


def test_runs_keeps_every_runs_json_and_reports_medians_over_runs(tmp_path, monkeypatch, capsys):
    rates = iter([100.0, 300.0, 200.0])

    def once(args, path):
        rate = next(rates)
        results = {"env": {"x": 1}, "runs": [{"task": "forward", "mode": "float32", "sides": {
            "smollm_ref": {"tokens_per_s": bench.summary([rate]), "ratio_vs_transformers": bench.summary([rate / 100])}}}]}  # fmt: skip
        bench.write_json(results, path)
        return results

    monkeypatch.setattr(bench, "bench_once", once)
    out = tmp_path / "r.json"
    assert bench.main([*TINY, "--runs", "3", "--json", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.run1.json", "r.run2.json", "r.run3.json"]
    assert [json.loads((tmp_path / f"r.run{i}.json").read_text())["runs"][0]["sides"]["smollm_ref"]["tokens_per_s"]["median"]
            for i in (1, 2, 3)] == [100.0, 300.0, 200.0]  # fmt: skip
    over = json.loads(out.read_text())
    assert over["runs_files"] == ["r.run1.json", "r.run2.json", "r.run3.json"]
    fig = over["over_runs"]["forward | float32 | smollm_ref"]
    assert fig["tokens_per_s"]["median"] == 200.0 and (fig["tokens_per_s"]["min"], fig["tokens_per_s"]["max"]) == (100.0, 300.0)
    assert fig["ratio_vs_transformers"]["median"] == 2.0
    assert "Over 3 runs" in capsys.readouterr().out


def test_runs_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--runs", "0"])
    assert e.value.code == 2 and "--runs" in capsys.readouterr().err.strip().splitlines()[-1]


def test_step_memory_sees_what_a_step_allocates_and_resets_between_steps():
    """The high-water mark is reset before each measured call: a 64 MiB tensor made and freed inside it is seen,
    and a call that allocates nothing afterwards shows no such increment (it would with the mark left as it was)."""
    steady, peak = step_memory.measure(lambda: torch.ones(16 * 2**20).sum())  # 64 MiB of float32, touched
    assert peak - steady >= 60 * 2**20
    steady, peak = step_memory.measure(lambda: None)
    assert peak - steady < 16 * 2**20


def test_step_memory_ratios_hold_against_the_bounds_or_say_why_not():
    runs = {
        "sft": {"peak_mib": 1000.0, "peak_above_runtime_mib": 800.0},
        "dpo": {"peak_mib": 1200.0, "peak_above_runtime_mib": 1000.0},
        "sft-lora": {"error": "exit 1: TypeError: TrainConfig has no option(s) ['lora_rank']"},
    }
    rows = {r["ratio"]: r for r in step_memory.ratios(runs)}
    assert rows["dpo / sft"] == {"ratio": "dpo / sft", "bound": 1.15, "value": 1.2, "holds": False, "above_runtime": 1.25,
                                 "above_runtime_holds": False}  # fmt: skip
    assert rows["sft-lora / sft"]["value"] is None and "lora_rank" in rows["sft-lora / sft"]["not_measured"]
    assert set(rows) == {"dpo / sft", "sft-lora / sft"}  # a ratio needs both of its configurations asked for


def test_step_memory_end_to_end_on_the_tiny_preset(tmp_path, capsys):
    """Both configurations run the trainer's step in their own process, over the same tokens (the digest of the
    step's rows), and the bound of issue 21 is reported on them."""
    out = tmp_path / "m.json"
    args = ["--model-config", "smollm2-tiny", "--n", "4", "--seq-len", "64", "--configs", "sft,dpo", "--repeats", "1",
            "--mmap-threshold", "131072"]  # fmt: skip
    assert step_memory.main([*args, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    runs = results["runs"]["fp32"]
    for config in ("sft", "dpo"):
        run = runs[config]
        assert "error" not in run, run
        assert run["batch_tokens"] == 4 * 64 and run["model_class"] == "LlamaForCausalLM" and not run["fast_step"]
        assert 0 < run["runtime_rss"] < run["steady_rss"][0] < run["peak_rss"][0]
        assert run["peak_rss"][0] == max(run["peak_rss_phases"]["forward_backward"][0], run["peak_rss_phases"]["optimizer"][0])
        assert run["trainable_parameters"] == run["parameters"] and run["optimizer_state_bytes"] >= 2 * run["parameter_bytes"]
        assert run["mmap_threshold"] == "131072"  # the option reaches the configuration's process
    assert runs["dpo"]["options"]["batch_size"] * 2 == runs["sft"]["options"]["batch_size"] == 4
    assert runs["sft"]["batch_sha256"] == runs["dpo"]["batch_sha256"] and results["same_tokens"] == {"fp32": True}
    (ratio,) = results["ratios"]["fp32"]
    assert ratio["ratio"] == "dpo / sft" and ratio["bound"] == 1.15 and ratio["value"] > 0 and isinstance(ratio["holds"], bool)
    assert (
        results["env"]["cpu"]["model"]
        and results["env"]["torch"]
        and results["malloc"].startswith("MALLOC_MMAP_THRESHOLD_=131072")
    )
    table = capsys.readouterr().out
    assert results["env"]["cpu"]["model"] in table and "| fp32 | dpo / sft |" in table


def test_step_memory_refuses_an_odd_number_of_sequences(capsys):
    with pytest.raises(SystemExit) as e:
        step_memory.main(["--n", "3"])
    assert e.value.code == 2 and "--n" in capsys.readouterr().err.strip().splitlines()[-1]
