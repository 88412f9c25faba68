"""The shape the codebase keeps (issue 14): small functions and classes in the product packages,
so that each file holds one job a newcomer can read. Simulation scripts may keep long mains."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("client", "server", "common")
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 250


def _definitions() -> list[tuple[str, ast.AST]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node))
    return found


def _length(node: ast.AST) -> int:
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])  # type: ignore[attr-defined]
    return int(node.end_lineno) - start + 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind, limit", [("function", MAX_FUNCTION_LINES), ("class", MAX_CLASS_LINES)])
def test_no_function_or_class_outgrows_its_limit(kind: str, limit: int) -> None:
    is_class = kind == "class"
    too_long = {
        where: _length(node)
        for where, node in _definitions()
        if isinstance(node, ast.ClassDef) == is_class and _length(node) > limit
    }
    assert not too_long, f"{kind}s over {limit} lines (split them by job): {too_long}"


def test_the_shape_check_sees_the_code() -> None:
    names = {where.split(" ")[1] for where, _ in _definitions()}
    assert {"EdgeSplitStrategy", "ReplyScreen", "Instructions"} <= names
