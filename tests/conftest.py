from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "multidigits.py"
RECON = Path(sys.executable).with_name("recon")

torch.set_num_threads(2)


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real ``recon`` console script; small data so it stays quick."""
    full_env = {
        **os.environ,
        "RECON_DIGITS_TRAIN": "128",
        "RECON_DIGITS_VAL": "64",
        "COLUMNS": "160",
        **(env or {}),
    }
    return subprocess.run([str(RECON), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path):
    def call(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=tmp_path, env=env)

    return call
