"""The type checker and the linter as tests: ``mypy`` (storprobe and plugins, as
configured in pyproject.toml's [tool.mypy]) and ``ruff check`` (the whole tree, as
[tool.ruff] says) must report nothing, so CI enforces both."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]' installs it)")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)


def test_mypy_finds_nothing():
    proc = _run("mypy", "--cache-dir", "/dev/null", "storprobe", "plugins")  # config: pyproject.toml
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout


def test_ruff_finds_nothing():
    proc = _run("ruff", "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All checks passed" in proc.stdout
