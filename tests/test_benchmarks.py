"""Smoke test: the methods benchmark runs end to end and prints its three tables (no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_methods_benchmark_runs_and_prints_every_table():
    out = subprocess.run(
        [sys.executable, "benchmarks/methods.py", "--quick", "--reps", "1", "--threads", "1", "--tasks", "2,3"]
        + ["--methods", "mgda,graddrop,gradops", "--markdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert any(line.startswith("| mgda | 3 | 1e+05 |") for line in lines)
    assert any(line.startswith("| gradops | 2 | 1e+05 |") and "| - |" in line for line in lines)  # no torchjd one
    cagrad_rows = [line for line in lines if line.startswith(("| 2 | 1e+05 |", "| 3 | 1e+05 |")) and "x |" in line]
    assert len(cagrad_rows) == 2  # CAGrad against scipy's SLSQP: the same update
    assert all(float(row.strip(" |").split("|")[-1]) > 0.9999 for row in cagrad_rows)
    assert "graddrop/(J@J.T + rand(P))" in out
