"""Core dependencies are what `import recon` and the CLI need; the optional ones stay optional; README agrees."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

OPTIONAL = ("torchjd", "lightning", "pytorch_lightning", "transformers", "torchmetrics", "cvxpy", "quadprog")

BLOCK = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: optional)", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def test_recon_and_the_cli_import_without_optional_packages():
    code = BLOCK + (
        "import recon, recon.methods, recon.plots, recon.dense, recon.lightning, cli.main\n"
        "from recon._runs import versions\n"
        "v = versions()\n"
        "assert {'recon', 'python', 'torch'} <= set(v), v\n"
        "print('imported', len(recon.methods.available()), 'methods')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "imported" in res.stdout


def test_pyproject_core_excludes_optional_packages_and_readme_lists_every_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert core.isdisjoint(OPTIONAL), core & set(OPTIONAL)
    extras = project["optional-dependencies"]
    assert {"solvers", "lightning", "hf", "dev"} <= set(extras)
    readme = (ROOT / "README.md").read_text()
    for name in extras:
        assert f"`.[{name}]`" in readme, name
    dev = " ".join(extras["dev"])
    for name in ("torchjd", "lightning", "transformers"):  # the tests exercise every optional integration
        assert name in dev
