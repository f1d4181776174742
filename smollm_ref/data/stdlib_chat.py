"""`stdlib-chat`: a chat set that needs no download, made from the documentation that ships with Python.

Each conversation asks about a standard-library module, function or class and is answered from its own
docstring (the first paragraph, with the call signature for callables), in the OpenAI/TRL `messages`
format. The order is fixed (sorted, then shuffled with a fixed seed), so the trainer's held-out tail is
the same set of questions on every run with the same Python."""

from __future__ import annotations

import importlib
import inspect
import random
import warnings

NAME = "stdlib-chat"

MODULES = (
    "argparse base64 bisect collections contextlib copy csv dataclasses datetime decimal difflib enum fractions functools "
    "glob gzip hashlib heapq io itertools json logging math operator os os.path pathlib pprint random re secrets shutil "
    "sqlite3 statistics string struct subprocess tempfile textwrap time typing unittest urllib.parse uuid zipfile"
).split()

_MODULE_QUESTIONS = ("What is the Python module `{name}` for?", "What does the `{name}` module in Python's standard library do?")
_MEMBER_QUESTIONS = (
    "What does `{name}` do in Python?",
    "How do I use `{name}`?",
    "Explain `{name}` from the Python standard library.",
)


def _first_paragraph(doc: str | None) -> str | None:
    if not doc:
        return None
    text = inspect.cleandoc(doc).split("\n\n")[0].strip()
    text = " ".join(line.strip() for line in text.splitlines())
    return text if 20 <= len(text) <= 600 else None


def _signature(obj, name: str) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return f"{name}(...)"


def _conversations_of(module_name: str, rng: random.Random) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    out = []
    about = _first_paragraph(module.__doc__)
    if about:
        question = rng.choice(_MODULE_QUESTIONS).format(name=module_name)
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": about}]})
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
        if attr.startswith("_"):
            continue
        obj = getattr(module, attr, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) not in (module_name, module.__name__, None) and not module_name.startswith("os"):
            continue  # re-exported from elsewhere: asked about where it is defined
        summary = _first_paragraph(obj.__doc__)
        if summary is None:
            continue
        name = f"{module_name}.{attr}"
        answer = f"`{_signature(obj, name)}`: {summary}" if callable(obj) else summary
        question = rng.choice(_MEMBER_QUESTIONS).format(name=name)
        if " at 0x" in answer:  # a default's repr with this process's address: the set must be the same in every process
            continue
        out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def records() -> list[dict]:
    """Every conversation of the set, in its fixed order (a few thousand; built in about a second)."""
    rng = random.Random(0)
    out = []
    for module_name in MODULES:
        try:
            out.extend(_conversations_of(module_name, rng))
        except ImportError:  # a Python built without it (sqlite3, say)
            continue
    random.Random(1).shuffle(out)
    return out
