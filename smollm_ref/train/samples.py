"""The trainer's samples: how one is drawn (`Sampling`: temperature, top-k and a seed of its own) and the
KV-cached draw itself. What a sample continues and how it is shown is the objective's
(`smollm_ref.train.objectives`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Sampling:
    """How the trainer's samples are drawn: temperature (0: greedy), top-k (None: every token), and the seed of
    the sample's own generator, so the training RNG is untouched."""

    temperature: float = 0.8
    top_k: int | None = 50
    seed: int = 0

    def describe(self) -> str:
        if self.temperature == 0:
            return "greedy"
        return f"temperature {self.temperature:g}, top-k {self.top_k or 'off'}, seed {self.seed}"

    def record(self) -> dict:
        """The fields metrics.jsonl keeps beside a sample, named as the options that set them."""
        return {"sample_temperature": self.temperature, "sample_top_k": self.top_k or 0, "sample_seed": self.seed}


def sample_seed(seed: int, step: int) -> int:
    """The seed of the sample at `step` of a run seeded with `seed`: the same for the same (seed, step), in a
    resumed run too, and another at every step (a fixed seed would draw the same noise at every sample)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_prompt_text(prompt: str) -> str:
    """The text a sample continues: `prompt` without spaces or tabs at its end (a BPE tokenizer puts a
    word's space in front of the word, so a prompt ending in one is continued with a second)."""
    return prompt.rstrip(" \t")


def draw(model, ids: torch.Tensor, max_new_tokens: int, autocast, sampling: Sampling, stop_id: int | None) -> list[int]:
    """The new tokens of a KV-cached sample continuing `ids` (1, T), up to `stop_id`; the model is in eval mode
    meanwhile. Raises ValueError when prompt and max_new_tokens together exceed the model's positions."""
    from ..generate import generate
    from ..sampling import SamplingParams

    params = SamplingParams(max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k)
    was_training = model.training
    model.eval()
    g = torch.Generator(device=ids.device).manual_seed(sampling.seed)
    try:
        with autocast:
            out = generate(model, ids, sampling=params, eos_token_id=stop_id, generator=g)
    finally:
        model.train(was_training)
    return out[0, ids.shape[1] :].tolist()
