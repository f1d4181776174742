"""Training metrics: FLOPs and MFU, throughput, and where they go (metrics.jsonl always, WandB when asked).

MFU = achieved model FLOP/s / the device's peak. Model FLOPs per token follow PaLM (Chowdhery et al.
2022, appendix B): 6N for the matmuls of forward and backward, N counting every weight a token is
multiplied by (the lm_head included even when it is tied to the embedding, the embedding lookup
excluded), plus 12 * L * H * Q * T for attention scores and values (L layers, H heads, Q head dim,
T sequence length), no causal discount. Peaks are dense (no sparsity) tensor-core numbers from the
vendors' data sheets; an unknown device gets no MFU rather than a guess.
"""

from __future__ import annotations

import json
import netrc
import os
import socket
import time
from pathlib import Path

from .config import ModelConfig

# Dense peak FLOP/s by (device-name fragment, precision). fp32 runs use TF32 tensor cores on CUDA
# (torch.set_float32_matmul_precision('high')), so their peak is the TF32 one. Order matters: the
# first fragment found in the device name wins.
PEAK_FLOPS = [
    ("H200", {"bf16-mixed": 989e12, "fp16-mixed": 989e12, "fp32": 494.5e12}),
    ("H100 PCIe", {"bf16-mixed": 756e12, "fp16-mixed": 756e12, "fp32": 378e12}),
    ("H100", {"bf16-mixed": 989e12, "fp16-mixed": 989e12, "fp32": 494.5e12}),  # SXM / HBM3
    ("A100", {"bf16-mixed": 312e12, "fp16-mixed": 312e12, "fp32": 156e12}),
]


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


def peak_flops(device_name: str, precision: str) -> float | None:
    for fragment, peaks in PEAK_FLOPS:
        if fragment in device_name:
            return peaks.get(precision)
    return None


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


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (a resumed run redoes them), keeping the file's other lines."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
