"""Training metrics: FLOPs and MFU, throughput, and where they go (metrics.jsonl always, WandB when asked).

MFU = achieved model FLOP/s / the device's peak. Model FLOPs per token follow PaLM (Chowdhery et al.
2022, appendix B): 6N for the matmuls of forward and backward, N counting every weight a token is
multiplied by (the lm_head included even when it is tied to the embedding, the embedding lookup
excluded), plus 12 * L * H * Q * T for attention scores and values (L layers, H heads, Q head dim,
T sequence length), no causal discount. Peaks are dense (no sparsity) tensor-core numbers from the
vendors' data sheets; an unknown device gets no MFU rather than a guess.
"""

from __future__ import annotations

import itertools
import json
import netrc
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import storage
from .config import ModelConfig


@dataclass(frozen=True)
class DevicePeak:
    """One accelerator's dense (no sparsity) tensor-core peaks, FLOP/s, from the vendor's data sheet."""

    name: str  # the part, as its data sheet names it
    bf16: float | None  # bf16 and fp16 alike
    tf32: float | None  # what fp32 matmuls run at on CUDA under torch.set_float32_matmul_precision("high")


# Rows match the words of `torch.cuda.get_device_name` ("NVIDIA A100-SXM4-80GB" -> NVIDIA, A100, SXM4, 80GB):
# the first row whose words all appear wins, so a variant comes before its family, and whole words keep an
# A100 from reading as an A10 and an L40S as an L4. The NVL parts run at other clocks and power than the
# SXM ones; without their own figures here they get no MFU rather than the SXM peak.
DEVICE_PEAKS: tuple[tuple[tuple[str, ...], DevicePeak], ...] = (
    (("H100", "PCIe"), DevicePeak("H100 PCIe", 756e12, 378e12)),
    (("H100", "NVL"), DevicePeak("H100 NVL", None, None)),
    (("H100",), DevicePeak("H100 SXM", 989e12, 494.7e12)),  # "NVIDIA H100 80GB HBM3"
    (("H200", "NVL"), DevicePeak("H200 NVL", None, None)),
    (("H200",), DevicePeak("H200", 989e12, 494.7e12)),  # the H100 SXM's compute with more, faster memory
    (("A100",), DevicePeak("A100", 312e12, 156e12)),  # SXM and PCIe alike
    (("L4",), DevicePeak("L4", 121e12, 60e12)),
    (("A10",), DevicePeak("A10", 125e12, 62.5e12)),
)
# Which peak a `--precision` runs at: mixed precision on the bf16/fp16 tensor cores, fp32 on the TF32 ones.
_PEAK_FIELD = {"bf16-mixed": "bf16", "fp16-mixed": "bf16", "fp32": "tf32"}


def matmul_params(config: ModelConfig) -> int:
    """Weights each token is multiplied by: all parameters minus the embedding lookup, plus the lm_head."""
    h, v = config.hidden_size, config.vocab_size
    embedding = v * h
    lm_head = v * h
    total = config.num_parameters()  # a tied lm_head is counted once, as the embedding
    untied_head = 0 if config.tie_word_embeddings else lm_head
    return total - untied_head - embedding + lm_head


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * matmul_params(config) + attention


def device_peak(device_name: str) -> DevicePeak | None:
    """The row of DEVICE_PEAKS for a device name, or None for a device not in the table."""
    words = set(re.split(r"[\s_-]+", device_name.upper()))
    for required, peak in DEVICE_PEAKS:
        if words.issuperset(w.upper() for w in required):
            return peak
    return None


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of `device_name` at a resolved `--precision`; None where unknown (no MFU then)."""
    peak = device_peak(device_name)
    field = _PEAK_FIELD.get(precision)
    return getattr(peak, field) if peak is not None and field is not None else None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


class Throughput:
    """Tokens per second of the last step, and averaged over this process's steps after the first
    (the first includes warm-up: allocator, kernels, compilation)."""

    def __init__(self):
        self.steps = 0
        self.timed_tokens = 0
        self.timed_seconds = 0.0

    def update(self, tokens: int, seconds: float) -> tuple[float, float]:
        self.steps += 1
        rate = tokens / max(seconds, 1e-9)
        if self.steps > 1:
            self.timed_tokens += tokens
            self.timed_seconds += seconds
        average = self.timed_tokens / self.timed_seconds if self.timed_seconds else rate
        return rate, average


def wandb_mode() -> str:
    """Decided before wandb.init, so that init never waits on a network it cannot reach: WANDB_MODE if
    set; else offline without an API key (environment or ~/.netrc); else online only if the server answers."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return "offline"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=3).close()
    except OSError:
        return "offline"
    return "online"


class MetricsLog:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl and mirrors it to WandB when enabled.
    Only the main rank creates one."""

    def __init__(self, run_dir: Path, wandb_run=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8")
        self.wandb_run = wandb_run

    def log(self, step: int, values: dict) -> None:
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


METRICS_LINE_LIMIT = 16 * 2**20  # a record is a few hundred bytes, one with a sample text a few kilobytes


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
