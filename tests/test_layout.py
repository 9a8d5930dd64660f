"""The layout the project promises: the CLI is a thin layer over the public API, and no function is long."""

from __future__ import annotations

import ast
from pathlib import Path

import recon

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_SUBMODULES = {"recon", "recon.methods", "recon.plots", "recon.lightning", "recon.dense"}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "recon":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "recon")
    return found


def test_cli_imports_only_public_names():
    offenders = []
    for path in sorted((ROOT / "cli").glob("*.py")):
        for module, names, line in _imports(path):
            if module not in PUBLIC_SUBMODULES:
                offenders.append(f"{path.name}:{line} imports {module}")
            elif module == "recon":
                offenders += [f"{path.name}:{line} imports recon.{n}" for n in names if n not in recon.__all__]
    assert offenders == []


def test_no_function_over_80_lines():
    long = []
    for folder in ("recon", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n >= 80:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_docstrings_point_inside_the_repository():
    outside = [
        str(p.relative_to(ROOT))
        for d in ("recon", "cli")
        for p in (ROOT / d).rglob("*.py")
        if "CONTRACT.md" in p.read_text()
    ]
    assert outside == []
