"""Streamed arrays (cosines.npy, gram.npy) are valid .npy from the first byte; a truncated one is one clear
line, not a numpy traceback, and the report survives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import recon
from recon._cosines import CosineRecorder, GramRecorder
from recon._errors import ReconError
from tests.conftest import ROOT
from tests.test_report import build_run


def test_the_header_is_on_disk_before_the_first_row(tmp_path) -> None:
    rec = CosineRecorder(tmp_path / "c.npy", 3, 1, device=torch.device("cpu"), chunk=256)
    assert np.load(tmp_path / "c.npy").shape == (0, 3, 1)
    rec.append(torch.tensor([[0.5], [-0.5], [float("nan")]]))  # on the CPU every row is written whole at once
    got = np.load(tmp_path / "c.npy", mmap_mode="r")
    assert got.shape == (1, 3, 1) and got[0, 1, 0] == -0.5
    rec.close()
    gram = GramRecorder(tmp_path / "g.npy", 2, 3, device=torch.device("cpu"))
    assert np.load(tmp_path / "g.npy").shape == (0, 2, 6)
    gram.close()


KILLED = textwrap.dedent(
    """
    import sys, time, torch, torch.nn.functional as F
    import recon
    from tests.test_plan import Deep, TASKS4

    def data():
        g = torch.Generator().manual_seed(0)
        for step in range(100):
            if step == 1:  # step 0 is done (recorded and stepped): say so and wait to be killed
                print("step 1 done", flush=True)
                time.sleep(600)
            yield torch.randn(8, 6, generator=g), {t: torch.randint(0, 2, (8,), generator=g) for t in TASKS4}

    recon.profile(Deep(), data(), {t: F.cross_entropy for t in TASKS4}, steps=100, out=sys.argv[1])
    """
)


def test_a_profile_killed_after_its_first_step_leaves_readable_arrays(tmp_path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "p")], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert proc.stdout.readline().strip() == "step 1 done"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    cos = np.load(tmp_path / "p" / "cosines.npy", mmap_mode="r")
    gram = np.load(tmp_path / "p" / "gram.npy", mmap_mode="r")
    K, pairs = 4, 6
    assert cos.shape == (1, 4, pairs) and gram.shape == (1, 4, K + pairs)
    assert np.isfinite(gram).all() and (gram[0, :, :K] > 0).all()
    # the recorded cosines are the Gram matrices' own: cos_ij = G_ij / sqrt(G_ii G_jj)
    i, j = np.triu_indices(K, 1)
    norms = np.sqrt(gram[0, :, :K])
    np.testing.assert_allclose(cos[0], gram[0, :, K:] / (norms[:, i] * norms[:, j]), rtol=1e-5)


@pytest.mark.parametrize("name", ["cosines.npy", "gram.npy"])
def test_a_truncated_array_is_one_line_naming_the_file(tmp_path, name: str) -> None:
    from tests.test_plan import TASKS4, Deep, _data

    data = _data(lambda g, b: torch.randn(b, 6, generator=g), n_steps=3)
    recon.profile(Deep(), data, {t: torch.nn.functional.cross_entropy for t in TASKS4}, steps=3, out=tmp_path / "p")
    path = tmp_path / "p" / name
    os.truncate(path, path.stat().st_size - 7)
    with pytest.raises(ReconError) as info:
        recon.ConflictProfile.load(tmp_path / "p")
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "re-run `recon profile`" in message
    assert "\n" not in message and "mmap" not in message


def test_the_report_survives_a_truncated_profile(tmp_path) -> None:
    run = build_run(tmp_path)
    path = run / "profile" / "cosines.npy"
    os.truncate(path, path.stat().st_size - 4)
    rep = recon.report(run, write=True)
    assert rep.scores is None and rep.variants is not None
    assert any("cosines.npy is truncated" in p for p in rep.problems)
    assert "truncated" in rep.markdown
