"""The step's speed and progress figures, computed in this one place: step_time, tokens_per_sec,
avg_tokens_per_sec, tokens, epoch and MFU (the FLOPs and peak tables they use are `smollm_ref.metrics`')."""

from __future__ import annotations

import time


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


class StepMetrics:
    """Times each step (`start`, then `measure`) and turns it into the step record's figures.

    tokens_per_step: tokens one optimizer step reads on all ranks (ranks x batch x accumulation x seq_len);
    flops_per_token: training FLOPs per token (`metrics.flops_per_token`); peak: one device's dense peak FLOP/s
    (`metrics.peak_flops`), None where unknown (then no MFU). MFU = flops_per_token x tokens/s / (peak x ranks)."""

    def __init__(self, tokens_per_step: int, flops_per_token: int, peak: float | None, world_size: int):
        self.tokens_per_step, self.flops_per_token, self.peak, self.world_size = (
            tokens_per_step,
            flops_per_token,
            peak,
            world_size,
        )
        self.throughput = Throughput()
        self.t0 = None

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def measure(self, tokens_seen: int, epoch: float) -> dict:
        """The figures of the step started last: seconds since `start`, tokens/s (this step's and the average),
        the run's tokens seen and epoch after it, and MFU where the peak is known."""
        elapsed = time.perf_counter() - self.t0
        rate, average = self.throughput.update(self.tokens_per_step, elapsed)
        values = {
            "step_time": elapsed,
            "tokens_per_sec": rate,
            "avg_tokens_per_sec": average,
            "tokens": tokens_seen,
            "epoch": epoch,
        }
        if self.peak:
            values["mfu"] = self.flops_per_token * rate / (self.peak * self.world_size)
        return values
