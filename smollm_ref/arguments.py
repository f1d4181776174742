"""What every command line of the package shares: an argument error is one line (not the whole usage text),
and a whole number may be written as 2e9 wherever one is asked for."""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors are one line, `error: ...; see PROG --help`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def whole_number(text: str) -> int:
    """An integer written as 128, 2e9, 1_000 or 4.0; ArgumentTypeError for 1.5, nan, inf or anything else.
    Read through Decimal, so 12345678901234567e3 stays exact (a float would round it)."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not value.is_finite() or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)
