"""What the README's first section promises a new user: the virtual environment comes before anything is
installed, and the test command's time is stated, the same figure as the noxfile's (issue 18 item 17)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _first_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Two commands")
    return text[start : text.index("\n## ", start + 1)]


def _minutes(text: str) -> set[str]:
    return set(re.findall(r"(\d+-\d+|\d+) minutes", text))


def test_the_virtual_environment_comes_before_the_first_install():
    section = _first_section()
    commands = [line for line in section.splitlines() if line.startswith("python3 ")]
    assert commands and "-m venv" in commands[0], commands
    assert all("pip install" not in line for line in section[: section.index("-m venv")].splitlines())


def test_the_test_command_says_how_long_it_takes_and_the_noxfile_agrees():
    section = _first_section()
    command = section.index("python3 -m nox -s tests parity")
    stated = _minutes(section[section.rindex("# 2.", 0, command) : command])
    assert stated, "the test command's comment gives no time"
    noxfile = (REPO / "noxfile.py").read_text()
    assert stated <= _minutes(noxfile) and stated <= _minutes(section[command:])
    assert "a few minutes" not in noxfile
