"""Options and session-wide fixtures of the parity suite.

    pytest parity/ [--model SOURCE] [--report-dir DIR]

Each model is loaded once per session. Every check adds a section to one report, which is printed as
per-layer tables at the end of the run and written as DIR/parity.md and DIR/parity.json.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parity import sources
from parity.report import Report
from smollm_ref.weights import PYPI_SOURCE

DEFAULT_REPORT_DIR = Path(__file__).resolve().parent / "reports"
_REPORT = pytest.StashKey[Report]()
_WRITTEN = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("parity", "smollm_ref vs transformers parity")
    group.addoption(
        "--model", default=PYPI_SOURCE, help=f"model source: Hub id, transformers directory, .gguf or {PYPI_SOURCE} (default)"
    )
    group.addoption(
        "--report-dir", default=str(DEFAULT_REPORT_DIR), help="where parity.md and parity.json go (default parity/reports/)"
    )


def pytest_configure(config):
    source = config.getoption("--model", default=PYPI_SOURCE)
    config.stash[_REPORT] = Report({"model": source, **sources.versions(), "device": "cpu"})


def pytest_sessionfinish(session):
    report = session.config.stash.get(_REPORT, None)
    if report is not None and report.sections:
        session.config.stash[_WRITTEN] = report.write(session.config.getoption("--report-dir"))


def pytest_terminal_summary(terminalreporter, config):
    report = config.stash.get(_REPORT, None)
    if report is None or not report.sections:
        return
    terminalreporter.section("parity: per-layer tables")
    terminalreporter.write_line(report.text())
    for path in config.stash.get(_WRITTEN, []):
        terminalreporter.write_line(f"report written: {path}")


@pytest.fixture(scope="session")
def report(pytestconfig) -> Report:
    return pytestconfig.stash[_REPORT]


@pytest.fixture(scope="session")
def source(pytestconfig) -> str:
    return pytestconfig.getoption("--model")


@pytest.fixture(scope="session")
def tokenizer(source, report):
    tok, origin = sources.tokenizer_for(source)
    report.context["tokenizer"] = origin
    return tok


@pytest.fixture(scope="session")
def load(source):
    """load(library, dtype): the model of `--model` from 'smollm_ref' or 'transformers', loaded once."""
    loaded = {}

    def get(library: str, dtype: torch.dtype):
        if (library, dtype) not in loaded:
            loader = sources.load_ours if library == "smollm_ref" else sources.load_transformers
            loaded[library, dtype] = loader(source, dtype)
        return loaded[library, dtype]

    return get


@pytest.fixture(scope="session")
def ours(load):
    return load("smollm_ref", torch.float32)


@pytest.fixture(scope="session")
def theirs(load):
    return load("transformers", torch.float32)


@pytest.fixture(scope="session")
def bit_identical_expected(report) -> bool:
    expected = sources.expect_bit_identical("cpu")
    pins = sources.pins()
    report.context["bit-identity asserted"] = (
        f"yes (torch {pins['torch']}, transformers {pins['transformers']} on CPU, as pinned in constraints.txt)"
        if expected
        else "no: versions differ from constraints.txt, so only float32 assert_close is asserted and bit-identity is counted"
    )
    return expected
