"""The test suite's own layout: helpers are shared through oracle.py (tools as
oracles, checks) and builders.py (image builders), never by importing another
test module, so collecting one test file never runs another's module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_module_imports_a_test_module():
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}:{node.lineno} imports {name}" for name in names if name.startswith("test_")]
    assert offenders == []
