"""Small files the code reads (configs, recipes, indexes, manifests, caches): regular files only, bounded in
size, one-line errors for what is not JSON, never a hang on a FIFO or an endless read of a device."""

from __future__ import annotations

import os

import pytest

from smollm_ref.storage import BadFile, read_small_json, read_small_text


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "recipe.json"
    os.mkfifo(fifo)  # with no writer, a plain open() for reading would block forever
    with pytest.raises(BadFile, match="not a regular file"):
        read_small_json(fifo, "recipe")


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_devices_are_refused(path):
    with pytest.raises(BadFile, match="not a regular file"):
        read_small_text(path, "config")


def test_directory_is_refused(tmp_path):
    with pytest.raises(BadFile, match="not a regular file"):
        read_small_text(tmp_path, "config")


def test_size_limit(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text("[" + "0," * 600 + "0]")
    assert len(read_small_json(path, "tuning cache", limit=2000)) == 601
    with pytest.raises(BadFile, match="more than the 1,000 bytes"):
        read_small_json(path, "tuning cache", limit=1000)


def test_deep_nesting_and_bad_json_are_one_line(tmp_path):
    path = tmp_path / "index.json"
    path.write_text("[" * 100_000)
    with pytest.raises(BadFile, match="nests JSON too deeply"):
        read_small_json(path, "store index")
    path.write_text("{nope")
    with pytest.raises(BadFile, match=r"store index .*index.json is not valid JSON"):
        read_small_json(path, "store index")
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(BadFile, match="not UTF-8"):
        read_small_json(path, "store index")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_small_text(tmp_path / "absent.json")
