"""The ready banner's example command names this executable the way the reader can paste it:
by name when PATH finds this very file, else by a path from the current directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spawnmesh.node import _command_name


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_on_path_is_called_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = _exe(tmp_path / "usr/local/bin/spawnmesh")
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}/usr/bin")
    monkeypatch.chdir("/")
    assert _command_name(str(exe)) == "spawnmesh"  # not usr/local/bin/spawnmesh


def test_not_on_path_relative_to_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _exe(tmp_path / ".venv/bin/spawnmesh")
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.chdir(tmp_path)
    assert _command_name(".venv/bin/spawnmesh") == os.path.join(".venv", "bin", "spawnmesh")
    _exe(tmp_path / "spawnmesh")
    assert _command_name("spawnmesh") == os.path.join(".", "spawnmesh")


def test_elsewhere_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = _exe(tmp_path / "opt/spawnmesh")
    other = tmp_path / "work"
    other.mkdir()
    monkeypatch.setenv("PATH", "/usr/bin")
    monkeypatch.chdir(other)
    assert _command_name(str(exe)) == str(exe)
    assert _command_name("../opt/spawnmesh") == str(exe)


def test_other_names_fall_back_to_the_command() -> None:
    assert _command_name("/usr/bin/python3") == "spawnmesh"
    assert _command_name("") == "spawnmesh"
