#!/usr/bin/env python
"""Lint: statements after a `return`, `raise`, `continue` or `break` in the same block never run.

ruff (0.17) has no stable unreachable-code rule, and a check placed after a `return` passes review and never
runs. Usage: python scripts/check_unreachable.py [PATH ...] (default: megatron_gift tools tests benchmarks
scripts). Prints `file:line: unreachable ...` for each one and exits 1 if any.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

TERMINAL = (ast.Return, ast.Raise, ast.Continue, ast.Break)
BLOCKS = ("body", "orelse", "finalbody")
DEFAULT_PATHS = ("megatron_gift", "tools", "tests", "benchmarks", "scripts")


def unreachable(tree: ast.AST) -> Iterator[Tuple[int, str]]:
    """(line, terminal statement kind) of the first statement after a terminal one, per block (except and
    case bodies are nodes of their own that ast.walk visits)."""
    for node in ast.walk(tree):
        blocks: List[List[ast.stmt]] = [getattr(node, name) for name in BLOCKS if isinstance(getattr(node, name, None), list)]
        for stmts in blocks:
            for prev, stmt in zip(stmts, stmts[1:]):
                if isinstance(prev, TERMINAL) and isinstance(stmt, ast.stmt):
                    yield stmt.lineno, type(prev).__name__.lower()
                    break


def check_paths(paths: List[str]) -> List[str]:
    problems = []
    for root in paths:
        files = [Path(root)] if root.endswith(".py") else sorted(Path(root).rglob("*.py"))
        for f in files:
            tree = ast.parse(f.read_text(), filename=str(f))
            problems += [f"{f}:{line}: unreachable (follows a {kind} in the same block)" for line, kind in unreachable(tree)]
    return problems


def main(argv: List[str]) -> int:
    problems = check_paths([p for p in (argv or DEFAULT_PATHS) if Path(p).exists()])
    print("\n".join(problems) or "no unreachable statements")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
