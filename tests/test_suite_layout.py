"""The test suite's own layout: helpers are shared through oracle.py (tools as
oracles, checks) and builders.py (image builders), never by importing another
test module, so collecting one test file never runs another's module."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

from oracle import require

TESTS = Path(__file__).resolve().parent


def test_no_module_imports_a_test_module():
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}:{node.lineno} imports {name}" for name in names if name.startswith("test_")]
    assert offenders == []


def test_the_storprobe_command_tests_run_is_this_interpreters():
    """Tests that run ``storprobe`` run the one installed beside this interpreter
    (a virtual environment's is not on ``PATH``): never another installation's,
    and never skipped for want of one on ``PATH``."""
    beside = shutil.which("storprobe", path=str(Path(sys.executable).parent))
    if beside is None:
        pytest.skip("storprobe is not installed beside this interpreter (.ci/run installs it)")
    assert require("storprobe") == beside
