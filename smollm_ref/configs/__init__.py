"""Model presets and training recipes, shipped inside the package as data.

    models/   transformers `config.json` files, read by `ModelConfig.from_name("smollm2-135m")`
    recipes/  training options, read by `python -m smollm_ref.train --recipe quickstart`

They are found through `importlib.resources`, so a source checkout, an editable install and an installed
wheel resolve the same names (a path relative to the repository would not exist in a wheel).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _directory(kind: str) -> Path:
    # pip installs wheels unzipped, so the package's resources are plain files with a filesystem path.
    return Path(str(files(__name__).joinpath(kind)))


def _names(kind: str) -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in _directory(kind).iterdir() if p.name.endswith(".json"))


def _path(kind: str, what: str, name: str) -> Path:
    names = _names(kind)
    if name not in names:  # also refuses names that would walk out of the directory
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(names)}")
    return _directory(kind) / f"{name}.json"


def preset_names() -> list[str]:
    """Names of the model presets (`smollm2-135m`, ..., `smollm2-tiny`)."""
    return _names("models")


def preset_path(name: str) -> Path:
    """The `config.json` of model preset `name`; a ValueError listing the presets if there is none."""
    return _path("models", "model preset", name)


def recipe_names() -> list[str]:
    """Names of the training recipes (`quickstart`, `original`)."""
    return _names("recipes")


def recipe_path(name: str) -> Path:
    """The JSON file of training recipe `name`; a ValueError listing the recipes if there is none."""
    return _path("recipes", "recipe", name)
