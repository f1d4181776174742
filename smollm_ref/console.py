"""Lines for the person at the console while a tqdm progress bar may be open (preparing a token store,
training): `tqdm.write` clears the bar, writes the line and draws the bar again, so neither is cut in two."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """Write `message` and a newline to stderr without breaking an open tqdm progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)
