"""`stdlib-preferences`: a preference set that needs no download, made from the documentation that ships with Python.

Each pair asks one of `stdlib-chat`'s questions about a standard-library module, function or class (the prompt, a
user message); the chosen reply is its documented answer (the docstring's first paragraph, with the call signature
for callables), the rejected reply the documented answer of a question about another module, in TRL's
conversational preference format (`prompt`, `chosen` and `rejected` message lists).

No text is in two pairs: the questions are split in two, every other one asked and the rest never asked, their
answers the rejected replies, each used once. So whichever tail of the pairs the trainer holds out (--val-fraction:
the last pairs, `smollm_ref.data.preferences.preference_data`), no prompt, chosen or rejected reply of a held-out
pair is in a training pair. (`stdlib-chat` leaves out answers whose signature shows a default's repr with its
address, `<function f at 0x7f...>`: they differ from process to process, and the set must be the same in every run
and its resume.) The order is fixed (`stdlib-chat`'s, which is sorted, then shuffled
with a fixed seed), so the held-out tail is the same pairs on every run with the same Python. (`stdlib-chat` holds
the same answers as conversations: a model fine-tuned on it has seen the held-out replies.)"""

from __future__ import annotations

from .stdlib_chat import MODULES
from .stdlib_chat import records as chat_records

NAME = "stdlib-preferences"


def module_of(question: str) -> str:
    """The module a `stdlib-chat` question asks about: the longest of MODULES that the `name` in its backticks is or
    starts with (`os.path.join` asks about os.path, `os.getcwd` about os)."""
    name = question.split("`")[1]
    return max((m for m in MODULES if name == m or name.startswith(m + ".")), key=len)


def _questions() -> list[tuple[str, str, str]]:
    """(module, question, answer) of every `stdlib-chat` conversation whose answer is the same in every process,
    each question and each answer once, in the set's order."""
    out, seen = [], set()
    for record in chat_records():
        question, answer = (message["content"] for message in record["messages"])
        if question in seen or answer in seen:
            continue
        seen.update((question, answer))
        out.append((module_of(question), question, answer))
    return out


def records() -> list[dict]:
    """Every pair of the set, in its fixed order (a few hundred; built in about a second). The even questions are
    asked; each takes as its rejected reply the first unused answer of the odd ones that is about another module
    (a question left without one is dropped)."""
    questions = _questions()
    asked, unasked = questions[0::2], questions[1::2]
    out = []
    for module, question, answer in asked:
        other = next((i for i, (m, _, _) in enumerate(unasked) if m != module), None)
        if other is None:
            continue
        rejected = unasked.pop(other)[2]
        out.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return out
