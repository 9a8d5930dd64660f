"""README.md is a front page whose snippets run as written: every code block marked ``<!-- runnable -->`` runs,
in order, in one fresh folder (small data sizes), and the page stays short."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import recon
from tests.conftest import ROOT

MARK = "<!-- runnable -->"
BLOCK = re.compile(re.escape(MARK) + r"\n```(\w+)\n(.*?)\n```", re.S)
SMALL = {"RECON_DIGITS_TRAIN": "128", "RECON_DIGITS_VAL": "64", "COLUMNS": "160"}


def runnable_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_readme_is_a_front_page() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert text.count(MARK) == len(runnable_blocks()) >= 2  # every mark sits right above a code block
    assert "## Does branching pay?" in text and "benchmarks/results/evidence.md" in text
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)\)", text):
        assert (ROOT / link).exists(), link


def test_every_runnable_readme_block_runs_as_written(tmp_path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, **SMALL, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    for language, code in runnable_blocks():
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        assert language in ("bash", "python"), language
        res = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"README block failed:\n{code}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    run = max((tmp_path / "runs").iterdir())  # the one run the blocks made
    assert recon.report(run, write=False).variants["Δm% ↓"].notna().any()  # the README's order gives it Δm%
