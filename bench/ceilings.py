"""The machine's own ceilings, measured in the bench's run, which every throughput figure is also reported against.

- GEMM: FLOP/s of the fastest matmul available here at the model's own shapes, each GEMM of a step weighted
  by how often the step runs it (forward: x @ W.T per linear and the lm_head; training adds the two backward
  GEMMs of each). Each shape takes the best of every implementation (`gemm_candidates`: torch.mm with each
  operand row- or column-major, F.linear, oneDNN's packed linear as the fast paths use it), so that no figure
  can beat its ceiling by using a kernel the ceiling left out. Train and forward figures are then a share of
  it: model FLOPs per token x tokens/s / ceiling, MFU measured against what this machine's kernels reach
  rather than a datasheet. Beside it, the CPU's theoretical peak (`peak_fma`), from /proc/cpuinfo.
- Bandwidth: how fast weights can be read from memory. The larger of a plain streaming read (a sum over a
  512 MB buffer, far larger than any cache) and the fastest matrix-vector pass over every weight matrix at
  batch 1 (each kind in its fastest layout, `smollm_ref.fast.packing`). Decode figures are a share of it:
  bytes of weights per token (the matmul weights in the compute dtype / batch size) x tokens/s / ceiling.

Compute-bound GEMMs are timed at up to TIMED_ROWS rows and the lm_head on LM_HEAD_COLUMNS of its rows (the
rate has converged well before the full size), so that measuring costs seconds, not minutes, on 2 cores.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from smollm_ref import metrics
from smollm_ref.config import ModelConfig
from smollm_ref.fast import tuning
from smollm_ref.fast.packing import choose_layouts, linear, onednn_available, pack_weights, relayout

# What the CPU has for matmuls; recorded in the JSON beside every figure.
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
TIMED_ROWS = 512
LM_HEAD_COLUMNS = 8192
LOSS_CHUNK_ROWS = 512  # the fast loss's lm_head chunk on CPU (`FastForward.chunk_size`)


def cpu_info() -> dict:
    """Model name, the matmul-relevant flags (the bf16 and AMX ones decide most of what follows), the
    kernel level torch dispatches to, cores and threads."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "model": tuning.cpu_model(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_in_hardware": bool(flags & {"avx512_bf16", "amx_bf16"}),
    }


@dataclass(frozen=True)
class Gemm:
    """(m, k) @ (k, n), run `count` times per step; `a_t` / `b_t`: the operand is the transpose of a
    contiguous tensor, as autograd hands them to the kernel."""

    name: str
    m: int
    k: int
    n: int
    count: float
    a_t: bool = False
    b_t: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n


def model_gemms(config: ModelConfig, rows: int, train: bool) -> list[Gemm]:
    """The GEMMs of one forward (train=False: logits of every row) or training step (forward, the gradient
    of the input and of the weight) over `rows` tokens, at timed sizes with counts scaled to the real ones."""
    c, d = config.hidden_size, config.head_dim
    linears = {
        "qkv": ((config.num_attention_heads + 2 * config.num_key_value_heads) * d, c),
        "o": (c, config.num_attention_heads * d),
        "gate_up": (2 * config.intermediate_size, c),
        "down": (c, config.intermediate_size),
    }
    timed = min(rows, TIMED_ROWS)
    scale = rows / timed
    layers = config.num_hidden_layers
    out: list[Gemm] = []
    for name, (n_out, n_in) in linears.items():
        out.append(Gemm(f"{name} x@W.T", timed, n_in, n_out, layers * scale, b_t=True))
        if train:
            out.append(Gemm(f"{name} dy@W", timed, n_out, n_in, layers * scale))
            out.append(Gemm(f"{name} dy.T@x", n_out, timed, n_in, layers * scale, a_t=True))
    # lm_head: training runs it a loss chunk at a time; the forward's logits on every row at once.
    v = config.vocab_size
    head_rows = min(rows, LOSS_CHUNK_ROWS) if train else timed
    cols = min(v, LM_HEAD_COLUMNS)
    head_scale = (rows / head_rows) * (v / cols)
    out.append(Gemm("lm_head x@W.T", head_rows, c, cols, head_scale, b_t=True))
    if train:
        out.append(Gemm("lm_head dlogits@W", head_rows, cols, c, head_scale))
        out.append(Gemm("lm_head dlogits.T@x", cols, head_rows, c, head_scale, a_t=True))
    return out


def _operand(rows: int, cols: int, transposed: bool, dtype, device) -> torch.Tensor:
    """A (rows, cols) operand, the transpose of a contiguous (cols, rows) tensor when `transposed` (column-major)."""
    g = torch.Generator(device).manual_seed(0)
    if transposed:
        return torch.randn(cols, rows, generator=g, device=device).to(dtype).t()
    return torch.randn(rows, cols, generator=g, device=device).to(dtype)


def gemm_candidates(g: Gemm, dtype: torch.dtype, device) -> dict[str, Callable[[], object]]:
    """Every implementation of g's (m, k) @ (k, n) product available here, by name, operands built once:
    torch.mm with each operand row- or column-major (the step's own layout among them), F.linear with the
    (n, k) weight it takes, and on a CPU with oneDNN the packed linear the fast paths use (the weight
    reordered once into oneDNN's blocked layout, untimed, as `packing.to_layout(w, "onednn")` does; the
    reorder is a one-off cost, left out as packing leaves it out of inference). Any product can be written
    x @ W.T, so every shape gets every implementation. An implementation whose first call fails (a dtype
    oneDNN cannot reorder on this torch) is dropped when timed (`best_seconds`)."""
    device = torch.device(device)
    a = {t: _operand(g.m, g.k, t, dtype, device) for t in (False, True)}
    b = {t: _operand(g.k, g.n, t, dtype, device) for t in (False, True)}
    layout = {False: "row-major", True: "column-major"}
    out: dict[str, Callable[[], object]] = {}
    for ta in (False, True):
        for tb in (False, True):
            out[f"mm a {layout[ta]}, b {layout[tb]}"] = lambda x=a[ta], y=b[tb]: torch.mm(x, y)
    weight = b[True].t()  # (n, k) contiguous: b as the weight of a linear layer
    out["F.linear"] = lambda: F.linear(a[False], weight)
    if onednn_available(device):
        packed: list[torch.Tensor] = []

        def onednn():
            if not packed:  # reordered at the first (untimed, warming) call; a dtype it cannot take fails there
                packed.append(torch.ops.mkldnn._reorder_linear_weight(weight, None))
            return torch.ops.mkldnn._linear_pointwise(a[False], packed[0], None, "none", [], "")

        out["oneDNN packed linear"] = onednn
    return out


def best_seconds(candidates: dict, device, repeats: int) -> dict:
    """Best seconds of each candidate (any hashable key -> callable) whose first call succeeds, timed in
    `repeats` interleaved passes after that first, untimed call (`tuning.time_candidates`). A candidate
    that raises at its first call is left out (the one-line cause is not needed: another implementation
    of the same shape stands in)."""
    device = torch.device(device)
    working = {}
    for key, fn in candidates.items():
        try:
            fn()
        except (RuntimeError, NotImplementedError, ValueError):
            continue
        working[key] = fn
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return tuning.time_candidates(working, repeats, sync, warm=False)


def _best_seconds(fn, device, repeats: int) -> float:
    """Best of `repeats` timed calls after one untimed call."""
    return best_seconds({0: fn}, device, repeats)[0]


def fastest_gemms(gemms: list[Gemm], dtype, device, repeats: int) -> list[tuple[str, float, dict[str, float]]]:
    """For each GEMM: (name of its fastest implementation, its best seconds, best seconds of every
    implementation that ran), all of them timed in the same interleaved passes."""
    candidates = {(i, name): fn for i, g in enumerate(gemms) for name, fn in gemm_candidates(g, dtype, device).items()}
    seconds = best_seconds(candidates, device, repeats)
    out = []
    for i in range(len(gemms)):
        mine = {name: t for (j, name), t in seconds.items() if j == i}
        if not mine:
            raise RuntimeError(f"no matmul implementation ran for {gemms[i].name} in {dtype}")
        best = min(mine, key=mine.get)
        out.append((best, mine[best], mine))
    return out


def gemm_ceiling(config: ModelConfig, rows: int, dtype: torch.dtype, device, train: bool, repeats: int = 5) -> dict:
    """FLOP/s of the step's GEMMs: sum(count x FLOPs) / sum(count x best time), each GEMM at the rate of its
    fastest implementation (`gemm_candidates`). The GEMMs are timed in `repeats` passes over all of them,
    each keeping its best: a moment of contention on a shared machine then costs one pass, not the ceiling
    (which must not fall below what a figure reaches). parts: each GEMM's rate, the implementation that
    reached it and every implementation's rate (GFLOP/s)."""
    gemms = model_gemms(config, rows, train)
    best = fastest_gemms(gemms, dtype, device, repeats)
    flops = sum(g.count * g.flops for g in gemms)
    seconds = sum(g.count * t for g, (_, t, _) in zip(gemms, best))
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
        "train": train,
        "flops_per_s": flops / seconds,
        "gemm_seconds_per_step": seconds,
        "parts": [
            {"gemm": g.name, "mnk": [g.m, g.n, g.k], "gflops": round(g.flops / t / 1e9, 1), "fastest": name,
             "gflops_each": {k: round(g.flops / v / 1e9, 1) for k, v in each.items()}}
            for g, (name, t, each) in zip(gemms, best)
        ],
    }  # fmt: skip


# FLOPs per cycle per core of one FMA unit, by the widest vector the flags name: lanes x 2 (a multiply and an add).
SIMD_FP32_LANES = (("avx512f", 16), ("avx2", 8), ("avx", 8), ("sse2", 4))
FMA_UNITS = 2  # per core: the most any x86 core has (Intel Xeon Gold/Platinum, AMD Zen 5); Zen 4 has half at 512 bits
AMX_BF16_FLOPS_PER_CYCLE = 1024  # per core: Intel's figure for AMX-BF16 (Sapphire Rapids and later)


def peak_fma(cpuinfo: str | None = None, cpus: int | None = None) -> dict:
    """The CPU's theoretical peak FLOP/s in float32 and bfloat16: cpus x clock x FMA units x SIMD lanes x 2.

    cpus: the CPUs this process may run on (each counted as a core: hyperthreads sharing a core would halve
    it); clock: the highest `cpu MHz` or `@ N.NNGHz` of /proc/cpuinfo (under a hypervisor this is often the
    base clock, and a core that boosts above it beats this peak: `clock_implied_by` then says what clock a
    measured rate needs); FMA units: FMA_UNITS, which /proc/cpuinfo does not give; lanes: float32 lanes of
    the widest vector in the flags (AVX-512 16, AVX2 8, SSE 4). bfloat16: twice float32 with AVX512-BF16
    (two products per float32 lane), AMX_BF16_FLOPS_PER_CYCLE per core with AMX-BF16, float32's rate
    without either (converted in software, at best as fast). A theoretical peak, never measured: what no
    kernel can exceed at that clock. Off Linux (no /proc/cpuinfo): rates None."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    flags: set[str] = set()
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.M)]
    mhz += [float(m) * 1000 for m in re.findall(r"^model name\s*:.*@\s*([0-9.]+)\s*GHz", cpuinfo, re.M)]
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    lanes = next((n for flag, n in SIMD_FP32_LANES if flag in flags), None)
    if not mhz or lanes is None:
        return {"float32": None, "bfloat16": None, "derivation": "no clock or SIMD flags in /proc/cpuinfo: peak unknown"}
    hz = max(mhz) * 1e6
    fp32_cycle = FMA_UNITS * lanes * 2
    if "amx_bf16" in flags:
        bf16_cycle, bf16_how = AMX_BF16_FLOPS_PER_CYCLE, f"AMX-BF16 {AMX_BF16_FLOPS_PER_CYCLE} FLOP/cycle"
    elif "avx512_bf16" in flags:
        bf16_cycle, bf16_how = 2 * fp32_cycle, "AVX512-BF16: 2 products per float32 lane"
    else:
        bf16_cycle, bf16_how = fp32_cycle, "no bf16 in hardware: float32's rate"
    return {
        "float32": cpus * hz * fp32_cycle,
        "bfloat16": cpus * hz * bf16_cycle,
        "cpus": cpus,
        "clock_hz": hz,
        "flops_per_cycle": {"float32": fp32_cycle, "bfloat16": bf16_cycle},
        "derivation": (
            f"theoretical peak: {cpus} CPUs x {hz / 1e9:.2f} GHz (/proc/cpuinfo; boost may be higher) x {FMA_UNITS} FMA units "
            f"(assumed) x {lanes} float32 lanes x 2 FLOPs; bfloat16: {bf16_how}"
        ),
    }


def clock_implied_by(flops_per_s: float, peak: dict, dtype: str) -> float | None:
    """The clock (Hz) at which `flops_per_s` would be `peak`'s rate for `dtype`: above peak["clock_hz"],
    the cores ran faster than /proc/cpuinfo said (or have more FMA units than assumed)."""
    if not peak.get(dtype):
        return None
    return flops_per_s / (peak["cpus"] * peak["flops_per_cycle"][dtype])


def stream_read(device, repeats: int = 7, size_bytes: int = 512 * 2**20) -> float:
    """Bytes/s of the machine's plainest streaming read: a sum over a buffer far larger than any cache."""
    with torch.no_grad():
        buffer = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
        return size_bytes / _best_seconds(buffer.sum, torch.device(device), repeats)


def bandwidth_ceiling(model, dtype: torch.dtype, read_bytes_per_s: float, repeats: int = 5) -> dict:
    """Read bandwidth for the decode's weights in `dtype`: the larger of `read_bytes_per_s` (`stream_read`)
    and a batch-1 matrix-vector pass over every matrix in the layouts `choose_layouts` picks. `model`'s
    matmul weights must fit in memory twice (they are packed once for the pass)."""
    with torch.no_grad():
        packed = pack_weights(model, dtype)
        layouts = choose_layouts(packed, 1)
        weight_bytes, gemv = _gemv_pass(relayout(packed, layouts), repeats)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes_per_step": weight_bytes,
        "stream_read_bytes_per_s": read_bytes_per_s,
        "gemv_pass_bytes_per_s": gemv,
        "layouts": layouts,
        "bytes_per_s": max(read_bytes_per_s, gemv),
    }


def _gemv_pass(packed, repeats: int) -> tuple[int, float]:
    """(bytes, bytes/s) of one row through every matmul weight of `packed`, the lm_head first."""
    matrices = [packed.lm_head] + [w for p in packed.layers for w in (p.qkv, p.o, p.gate_up, p.down)]
    weight_bytes = sum(w.shape[0] * w.shape[1] for w in matrices) * packed.dtype.itemsize
    xs = {w.shape[1]: torch.ones(1, w.shape[1], dtype=packed.dtype, device=packed.lm_head.device) for w in matrices}

    def gemv_pass():
        for w in matrices:
            linear(xs[w.shape[1]], w)

    return weight_bytes, weight_bytes / _best_seconds(gemv_pass, packed.lm_head.device, repeats)


def decode_share(tokens_per_s: float, batch: int, ceiling: dict) -> float:
    """Share of the bandwidth ceiling a decode rate reaches: each step reads the weights once for `batch` tokens."""
    return tokens_per_s * ceiling["weight_bytes_per_step"] / batch / ceiling["bytes_per_s"]


def flops_share(tokens_per_s: float, config: ModelConfig, seq_len: int, ceiling: dict) -> float:
    """Share of the GEMM ceiling a train (6N + attention FLOPs per token) or forward (a third of it) rate reaches."""
    per_token = metrics.flops_per_token(config, seq_len) / (1 if ceiling["train"] else 3)
    return tokens_per_s * per_token / ceiling["flops_per_s"]


class Ceilings:
    """The ceilings one bench run reports against, each measured the first time a figure needs it."""

    def __init__(self, config: ModelConfig, rows: int, seq_len: int, model, progress=lambda text: None):
        self.config, self.rows, self.seq_len, self.model = config, rows, seq_len, model
        self.device = model.lm_head.weight.device
        self.measured: dict[str, dict] = {}  # "gemm train bfloat16" / "bandwidth float32" -> what was measured
        self.read_bytes_per_s: float | None = None
        self.progress = progress

    def gemm(self, dtype: torch.dtype, train: bool) -> dict:
        key = f"gemm {'train' if train else 'forward'} {str(dtype).removeprefix('torch.')}"
        if key not in self.measured:
            self.progress(f"ceiling: {key}")
            c = gemm_ceiling(self.config, self.rows, dtype, self.device, train)
            if self.device.type == "cpu":
                peak = self.peak()
                name = c["dtype"]
                if peak.get(name):
                    c["theoretical_peak_flops_per_s"] = peak[name]
                    c["share_of_theoretical_peak"] = c["flops_per_s"] / peak[name]
                    c["clock_implied_hz"] = clock_implied_by(c["flops_per_s"], peak, name)
            self.measured[key] = c
        return self.measured[key]

    def peak(self) -> dict:
        """The CPU's theoretical peak (`peak_fma`), recorded once beside the measured ceilings."""
        if "peak fma" not in self.measured:
            self.measured["peak fma"] = peak_fma()
        return self.measured["peak fma"]

    def bandwidth(self, dtype: torch.dtype) -> dict:
        key = f"bandwidth {str(dtype).removeprefix('torch.')}"
        if key not in self.measured:
            self.progress(f"ceiling: {key}")
            if self.read_bytes_per_s is None:  # the machine's, whatever the dtype: measured once
                self.read_bytes_per_s = stream_read(self.device)
            self.measured[key] = bandwidth_ceiling(self.model, dtype, self.read_bytes_per_s)
        return self.measured[key]

    def bf16_speedup(self) -> float:
        """How much faster a bf16 GEMM of the MLP's shape runs than a float32 one here, each at its fastest
        implementation (`gemm_candidates`): under 1 where bf16 is emulated (no AVX512-BF16 or AMX). A quick
        probe (~1 s), for choosing the default plan."""
        n_in, n_out = self.config.hidden_size, self.config.intermediate_size
        g = Gemm("mlp", min(self.rows, TIMED_ROWS), n_in, n_out, 1, b_t=True)
        seconds = {dtype: fastest_gemms([g], dtype, self.device, 3)[0][1] for dtype in (torch.float32, torch.bfloat16)}
        return seconds[torch.float32] / seconds[torch.bfloat16]

    def probe(self, task: str, dtype: torch.dtype):
        """A quick re-measurement of the ceiling a figure of `task` (forward, train, decode) is against, to run
        between the rounds of its repetitions (a shared machine's speed drifts over minutes: each round is then
        compared with the ceiling measured beside it). Returns (start, measure, stop): measure() -> FLOP/s or
        bytes/s; start and stop hold and free what it needs (decode: a 512 MB buffer)."""
        if task == "decode":
            gemv = self.bandwidth(dtype)["gemv_pass_bytes_per_s"]  # measured once: it was never the larger
            held: list[torch.Tensor] = []
            size = 512 * 2**20

            def start():
                held.append(torch.ones(size // 4, dtype=torch.float32, device=self.device))

            def measure():
                with torch.no_grad():
                    return max(gemv, size / _best_seconds(held[0].sum, self.device, 3))

            return start, measure, held.clear
        ceiling = self.gemm(dtype, train=task == "train")
        gemms = model_gemms(self.config, self.rows, train=task == "train")
        # Each GEMM in the implementation that was fastest for it when the ceiling was measured.
        fastest = [part["fastest"] for part in ceiling["parts"]]
        calls = {(i, name): gemm_candidates(g, dtype, self.device)[name] for i, (g, name) in enumerate(zip(gemms, fastest))}

        def measure():
            best = best_seconds(calls, self.device, 1)
            return sum(g.count * g.flops for g in gemms) / sum(g.count * best[i, fastest[i]] for i, g in enumerate(gemms))

        return (lambda: None), measure, calls.clear

    def share(self, task: str, dtype: torch.dtype, tokens_per_s: float, batch: int = 1, ceiling: float | None = None) -> float:
        """The share of its ceiling (the one measured at the start, or `ceiling`: FLOP/s or bytes/s) that a
        figure of `task` (forward, train, decode) reaches."""
        if task == "decode":
            c = self.bandwidth(dtype)
            return decode_share(tokens_per_s, batch, c if ceiling is None else {**c, "bytes_per_s": ceiling})
        c = self.gemm(dtype, train=task == "train")
        return flops_share(tokens_per_s, self.config, self.seq_len, c if ceiling is None else {**c, "flops_per_s": ceiling})
