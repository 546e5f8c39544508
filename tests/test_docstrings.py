"""Every public class and function (and every `__call__`) of the listed packages has a docstring.

AST only: nothing is imported, so this costs milliseconds. A name starting with "_" is private (not checked, nor is anything inside a private class), except `__call__`;
module-level definitions and class members (nested classes too) are checked, function bodies are not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("persongen_jax/models", "persongen_jax/pipeline", "persongen_jax/training", "persongen_jax/data/build")


def missing_docstrings(source: str, filename: str = "<string>") -> list[str]:
    """["filename:line qualified.name"] of the public definitions in `source` without a docstring."""
    missing = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if child.name.startswith("_") and child.name != "__call__":
                continue
            if not ast.get_docstring(child):
                missing.append(f"{filename}:{child.lineno} {prefix}{child.name}")
            if isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")

    visit(ast.parse(source, filename), "")
    return missing


def test_rule_matches_nodoc():
    source = '''
def public(): pass
def _private(): pass
def documented():
    """Doc."""
class Documented:
    """Doc."""
    def __init__(self): pass
    def __call__(self): pass
    def _helper(self): pass
    class Inner:
        def method(self): pass
class _Private:
    def method(self): pass
'''
    assert missing_docstrings(source, "m.py") == [
        "m.py:2 public",
        "m.py:9 Documented.__call__",
        "m.py:11 Documented.Inner",
        "m.py:12 Documented.Inner.method",
    ]


@pytest.mark.parametrize("package", PACKAGES)
def test_public_api_has_docstrings(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}: no Python files (moved? update PACKAGES)"
    missing = [m for f in files for m in missing_docstrings(f.read_text(), str(f.relative_to(ROOT)))]
    assert not missing, f"{len(missing)} public definitions without a docstring:\n" + "\n".join(missing)
