"""A run folder that cannot lie: locks, provenance, "partial" carried forward, errors printed as they are.

Each silent-wrong case of issue 20 is a test that fails loudly or does the right thing. Most run in-process
(``CliRunner``); the few that need real processes (two commands at once, a killed holder, torchrun) run the
console script.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import recon
from cli.main import app
from recon import ReconError, Run, _io, _lock
from tests.conftest import RECON
from tests.test_cli_split import RECIPE as SPLIT_RECIPE
from tests.test_distributed import torchrun_cli

RECIPE = SPLIT_RECIPE + textwrap.dedent(
    """
    import os, time

    def train_data():  # environment knobs: how many batches, how slow, and a failure on rank 1
        g = torch.Generator().manual_seed(0)
        for i in range(int(os.environ.get("TINY_BATCHES", "3"))):
            if os.environ.get("TINY_RAISE") and os.environ.get("RANK", "1") == "1":
                raise RuntimeError(os.environ["TINY_RAISE"])
            time.sleep(float(os.environ.get("TINY_SLEEP", "0")))
            yield torch.randn(8, 4, generator=g), {"a": torch.randint(0, 2, (8,), generator=g),
                                                   "b": torch.randint(0, 2, (8,), generator=g)}
    """
)
TASKS = ["a", "b"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """A folder holding the tiny recipe, as the current folder."""
    (tmp_path / "model.py").write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def last_line(res) -> str:
    return res.output.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------- one writer per folder
def _spawn(home: Path, *args: str, **env: str) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "200", **env}
    return subprocess.Popen(
        [str(RECON), *args], cwd=home, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_holder(lock: Path, pid: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if lock.exists() and f'"pid": {pid}' in lock.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{lock} never named PID {pid}")


def test_two_commands_on_one_folder_one_runs_the_other_exits_2_and_a_killed_holder_blocks_nothing(home) -> None:
    slow = {"TINY_BATCHES": "400", "TINY_SLEEP": "0.2"}
    holders = {
        "profile": _spawn(home, "profile", "model.py", "--out", "runs/r", "--steps", "400", **slow),
        "train/joint": _spawn(home, "train", "model.py", "--out", "runs/r", "--split", "none", **slow),
    }
    try:
        for stage, proc in holders.items():  # both hold their own stage: different stages do not block
            _wait_for_holder(_lock.lock_file(home / "runs/r" / stage), proc.pid, proc)
        second = {
            "profile": _spawn(home, "profile", "model.py", "--out", "runs/r", "--steps", "2", "--force"),
            "train/joint": _spawn(home, "train", "model.py", "--out", "runs/r", "--split", "none", "--force"),
        }
        for stage, proc in second.items():
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 2, out + err
            assert f"runs/r/{stage} is in use by PID {holders[stage].pid}" in err
            assert [line.startswith("error: ") for line in err.strip().splitlines()].count(True) == 1
    finally:
        for proc in holders.values():
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
    # the killed holders' locks block nothing; what they left is replaced whole (--force), nothing mixed
    again = [
        _spawn(home, "profile", "model.py", "--out", "runs/r", "--steps", "5", "--force"),
        _spawn(home, "train", "model.py", "--out", "runs/r", "--split", "none", "--epochs", "1", "--force"),
    ]
    for proc in again:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, out + err
    meta = json.loads((home / "runs/r/profile/profile.json").read_text())
    assert meta["steps"] == 5 and not meta["partial"]
    assert np.load(home / "runs/r/profile/cosines.npy").shape[0] == 5
    assert json.loads((home / "runs/r/train/joint/summary.json").read_text())["epochs"] == 1
    commands = [c["argv"][1] for c in json.loads((home / "runs/r/run.json").read_text())["commands"]]
    assert sorted(commands) == ["profile", "profile", "train", "train"]  # the refused commands recorded nothing


def test_a_lock_whose_recorded_holder_is_dead_is_broken(tmp_path) -> None:
    """A flock kept by an orphan (e.g. a forked child of a killed command) with a dead PID recorded is stale."""
    target = tmp_path / "stage"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, sys, time\nfd = os.open({str(_lock.lock_file(target))!r}, "
         f"os.O_RDWR | os.O_CREAT)\nfcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'{{\"pid\": {dead.stdout.strip()}}}')"
         "\nprint('held', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = _lock.FolderLock(target).acquire()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_a_live_holder_is_named(tmp_path) -> None:
    target = tmp_path / "stage"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from recon import _lock\n"
         f"_lock.hold({str(target)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ReconError, match=f"in use by PID {holder.pid}"):
            _lock.FolderLock(target).acquire()
    finally:
        holder.kill()
        holder.wait()
    _lock.FolderLock(target).acquire().release()  # the OS released it with its holder


# ------------------------------------------------------------------------------------------------ provenance
def test_an_unreadable_run_json_is_reported_not_skipped(tmp_path) -> None:
    old = Run.create(recipe=tmp_path / "model.py", tasks=TASKS, seed=0, out=tmp_path / "runs" / "old")
    newer = tmp_path / "runs" / "newer"
    newer.mkdir()
    (newer / "run.json").write_text('{"recipe": ')  # cut short by a crash
    for call in (lambda: Run.open(root=tmp_path / "runs"), lambda: Run.find(old.recipe, root=tmp_path / "runs")):
        with pytest.raises(ReconError, match=r"newer/run.json cannot be read .*repair or remove"):
            call()


def test_a_command_that_fails_on_its_arguments_writes_nothing(home) -> None:
    for args in (
        ["profile", "model.py", "--precision", "fp8"],
        ["profile", "model.py", "--method", "pcgard"],
        ["train", "model.py", "--split", "none", "--method", "pcgard"],
        ["train", "model.py", "--split", "none", "--precision", "fp8"],
        ["train", "model.py"],  # --split latest, and there is no run to take a plan from
    ):
        res = invoke(*args)
        assert res.exit_code == 2, res.output
        assert not (home / "runs").exists(), args
    assert "did you mean 'pcgrad'" in invoke("train", "model.py", "--method", "pcgard").output


def test_split_latest_without_a_plan_is_an_error_and_none_trains_unsplit(home) -> None:
    assert invoke("profile", "model.py", "--out", "runs/r", "--steps", "2").exit_code == 0
    res = invoke("train", "model.py", "--out", "runs/r", "--epochs", "1")
    assert res.exit_code == 2
    assert "runs/r has no split/plan.json" in res.output and "--split none" in res.output
    assert not (home / "runs/r/train").exists()
    res = invoke("train", "model.py", "--out", "runs/r", "--epochs", "1", "--split", "none")
    assert res.exit_code == 0, res.output
    assert (home / "runs/r/train/joint/summary.json").exists()


def test_resume_refuses_another_method_plan_or_recipe(home) -> None:
    assert invoke("profile", "model.py", "--out", "runs/r", "--steps", "3").exit_code == 0
    assert invoke("split", "--run", "runs/r", "--top-k", "1").exit_code == 0
    base = ["train", "model.py", "--out", "runs/r", "--epochs", "1", "--label", "v"]
    assert invoke(*base).exit_code == 0
    res = invoke(*base, "--epochs", "2", "--resume", "--method", "pcgrad")
    assert res.exit_code == 2 and "method (checkpoint: joint, now: pcgrad)" in res.output, res.output
    assert invoke("split", "--run", "runs/r", "--top-k", "2", "--force").exit_code == 0
    res = invoke(*base, "--epochs", "2", "--resume")
    assert res.exit_code == 2 and "split plan (checkpoint:" in res.output and "Traceback" not in res.output
    res = invoke(*base, "--epochs", "2", "--resume", "--split", "none")
    assert res.exit_code == 2 and "split plan" in res.output
    (home / "model.py").write_text(RECIPE + "\n# edited\n")
    res = invoke(*base[:-2], "--label", "v", "--epochs", "2", "--resume", "--split", "none")
    assert res.exit_code == 2 and "recipe file" in res.output
    assert len(last_line(res).splitlines()) == 1


def test_resume_with_the_same_everything_continues(home) -> None:
    base = ["train", "model.py", "--out", "runs/r", "--split", "none", "--method", "pcgrad"]
    assert invoke(*base, "--epochs", "1").exit_code == 0
    res = invoke(*base, "--epochs", "2", "--resume")
    assert res.exit_code == 0, res.output
    assert json.loads((home / "runs/r/train/pcgrad/summary.json").read_text())["epochs"] == 2


# ------------------------------------------------------------------------------------ "partial" carried forward
def _tiny_batches(n: int, stop_at: int | None = None):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        if i == stop_at:
            raise KeyboardInterrupt
        yield torch.randn(8, 4, generator=g), {t: torch.randint(0, 2, (8,), generator=g) for t in TASKS}


def _tiny_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_recipe", Path.cwd() / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_model()


def test_split_on_a_partial_profile_warns_records_and_can_refuse(home) -> None:
    run = Run.create(recipe="model.py", tasks=TASKS, seed=0, out="runs/r")
    with pytest.raises(KeyboardInterrupt):
        recon.profile(
            _tiny_model(), lambda: _tiny_batches(10, stop_at=4), {t: F.cross_entropy for t in TASKS},
            steps=10, out=run.stage("profile"),
        )  # fmt: skip
    res = invoke("split", "--run", "runs/r", "--top-k", "1", "--require-complete")
    assert res.exit_code == 2 and "partial profile (4 of 10 steps)" in res.output
    res = invoke("split", "--run", "runs/r", "--top-k", "1")
    assert res.exit_code == 0, res.output
    assert "warning: planned from a partial profile (4 of 10 steps)" in res.output
    plan = json.loads((home / "runs/r/split/plan.json").read_text())
    assert plan["profile_partial"] == {"steps": 4, "of": 10}
    markdown = recon.report("runs/r", write=False).markdown
    assert "4 steps profiled (**partial**: stopped after 4 of 10 steps)" in markdown
    assert "**Planned from a partial profile**: 4 of 10 steps." in markdown


def test_a_profile_that_ends_short_of_its_steps_is_partial(home) -> None:
    prof = recon.profile(_tiny_model(), iter(list(_tiny_batches(3))), {t: F.cross_entropy for t in TASKS}, steps=10)
    assert prof.steps == 3 and prof.partial and prof.meta["steps_asked"] == 10


def test_report_marks_an_interrupted_run_and_leaves_it_out_of_the_seeds_mean(home) -> None:
    run = Run.create(recipe="model.py", tasks=TASKS, seed=0, out="runs/r")
    losses = {t: F.cross_entropy for t in TASKS}
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        folder = run.stage("train", f"joint-s{seed}")
        kwargs = dict(method="joint", epochs=2, seed=seed, out=folder, val_data=list(_tiny_batches(2)))
        if seed < 2:
            run.save_summary(
                folder, recon.train(_tiny_model(), lambda: _tiny_batches(3), losses, **kwargs), tasks=TASKS
            )
            continue
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the second epoch
            recon.train(_tiny_model(), _interrupted_after(4), losses, **kwargs)
    summary = json.loads((run.dir / "train/joint-s2/summary.json").read_text())
    assert summary["partial"] is True and summary["epochs_done"] == 1 and summary["epochs"] == 2
    rep = recon.report(run.dir, write=True)
    assert rep.variants.loc["joint-s2", "partial"] == "1 of 2 epochs"
    assert rep.variants["partial"].drop("joint-s2").isna().all()
    assert int(rep.seeds.loc["joint", "seeds"]) == 2  # the interrupted run stays out of mean ± std
    assert "`partial` marks a run that was interrupted" in rep.markdown
    assert "`cos<0`" not in rep.markdown  # the prose names only the columns the table has
    assert "Δm% is empty: it needs the single-task baselines" in rep.markdown


def _interrupted_after(n: int):
    """Data (a function called per epoch) that raises KeyboardInterrupt at its ``n + 1``-th batch overall."""
    count = [0]

    def data():
        for batch in _tiny_batches(3):
            count[0] += 1
            if count[0] > n:
                raise KeyboardInterrupt
            yield batch

    return data


def test_metrics_csv_never_runs_ahead_of_the_checkpoint(home, monkeypatch) -> None:
    from recon import _train

    saved = _train._save_checkpoint

    def crash_on_second(folder, epoch, *args, **kwargs):
        if epoch == 2:
            raise OSError(errno.EIO, "killed while saving")
        saved(folder, epoch, *args, **kwargs)

    monkeypatch.setattr(_train, "_save_checkpoint", crash_on_second)
    with pytest.raises(OSError):
        recon.train(_tiny_model(), lambda: _tiny_batches(2), {t: F.cross_entropy for t in TASKS}, epochs=3, out="v")
    assert len((home / "v/metrics.csv").read_text().strip().splitlines()) == 2  # header + the checkpointed epoch
    assert torch.load(home / "v/checkpoint.pt", weights_only=True)["epoch"] == 1


def test_a_one_shot_iterator_for_two_epochs_is_an_error(home) -> None:
    losses = {t: F.cross_entropy for t in TASKS}
    torch.manual_seed(0)
    with pytest.raises(ReconError, match="one-shot iterator"):
        recon.train(_tiny_model(), _tiny_batches(3), losses, epochs=2)
    with pytest.raises(ReconError, match="one-shot iterator"):
        recon.profile(_tiny_model(), _tiny_batches(3), losses, epochs=2)
    gen = _tiny_batches(3)  # a function that hands out the same used-up generator again
    with pytest.raises(ReconError, match="epoch 2 of 2"):
        recon.train(_tiny_model(), lambda: gen, losses, epochs=2)


# ---------------------------------------------------------------------------------------- errors that survive
def test_a_message_with_markup_is_printed_verbatim(home, monkeypatch) -> None:
    monkeypatch.setenv("TINY_RAISE", "gloo said [/x] and [bold]no[/bold]")
    res = invoke("profile", "model.py", "--steps", "2")
    assert res.exit_code in (1, 2)
    assert "gloo said [/x] and [bold]no[/bold]" in res.output
    assert "MarkupError" not in res.output


def test_a_message_with_markup_survives_torchrun(home) -> None:
    args = ("profile", "model.py", "--out", "runs/r", "--device", "cpu", "--steps", "3")
    res = torchrun_cli(*args, cwd=home, env={"TINY_RAISE": "rank one [/x] broke"})
    assert res.returncode != 0
    assert "rank one [/x] broke" in res.stderr + res.stdout
    assert "MarkupError" not in res.stderr + res.stdout


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        for path in (_io.write_text(tmp_path / "a.txt", "x"), _io.save_torch(tmp_path / "b.pt", {"x": 1})):
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask
        run = Run.create(recipe=tmp_path / "model.py", tasks=TASKS, seed=0, out=tmp_path / "r")
        assert (run.dir / "run.json").stat().st_mode & 0o777 == 0o666 & ~umask
    finally:
        os.umask(old)


def test_stale_temporaries_are_cleaned_at_the_next_write(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".checkpoint.pt.{dead.stdout.strip()}.abc123.tmp"
    live = tmp_path / f".checkpoint.pt.{os.getppid()}.def456.tmp"  # a running writer's: kept
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    _io.save_torch(tmp_path / "checkpoint.pt", {"x": 1})
    assert not stale.exists() and live.exists()
    assert [p.name for p in tmp_path.glob(".checkpoint.pt.*.tmp")] == [live.name]


@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("4352 requested and 3520 written")]
)
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, error) -> None:
    def write(f):
        f.write(b"partial")
        raise error

    with pytest.raises(ReconError, match=r"no space left on the device while writing .*ckpt.pt; free some space"):
        _io._atomic(tmp_path / "ckpt.pt", write)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left


def test_an_unreadable_file_is_one_line_naming_it(home) -> None:
    assert invoke("profile", "model.py", "--out", "runs/r", "--steps", "2").exit_code == 0
    meta = home / "runs/r/profile/profile.json"
    meta.unlink()
    meta.mkdir()  # unreadable as a file, even for root (who ignores permissions)
    res = invoke("split", "--run", "runs/r", "--top-k", "1")
    assert res.exit_code == 1
    assert last_line(res).startswith("error: cannot read or write ") and "profile.json: Is a directory" in res.output
    assert "Traceback" not in res.output


# ------------------------------------------------------------------------------------------- the first screen
def test_next_hints_are_exact_commands_on_one_line(home) -> None:
    res = CliRunner().invoke(app, ["profile", "model.py", "--out", "runs/r", "--steps", "3"], env={"COLUMNS": "40"})
    assert res.exit_code == 0, res.output
    hint = [line for line in res.output.splitlines() if line.startswith("next: ")]
    assert len(hint) == 1 and hint[0].startswith("next: recon split --top-k ") and hint[0].endswith(" --run runs/r")
    res = CliRunner().invoke(app, ["split", "--run", "runs/r", "--top-k", "1"], env={"COLUMNS": "40"})
    assert "next: recon train model.py --split latest --out runs/r" in res.output.splitlines()
    res = invoke("train", "model.py", "--out", "runs/r", "--epochs", "1")
    assert "Δm% needs the single-task baselines: recon train model.py --single-task --split none --out runs/r" in (
        res.output.splitlines()
    )


def test_top_k_0_is_an_error_and_keeps_the_plan(home) -> None:
    assert invoke("profile", "model.py", "--out", "runs/r", "--steps", "3").exit_code == 0
    assert invoke("split", "--run", "runs/r", "--top-k", "1").exit_code == 0
    before = (home / "runs/r/split/plan.json").read_text()
    assert invoke("split", "--run", "runs/r", "--top-k", "0", "--force").exit_code == 2
    assert (home / "runs/r/split/plan.json").read_text() == before
    with pytest.raises(ReconError, match="positive integer"):
        recon.plan_split(recon.ConflictProfile.load(home / "runs/r/profile"), _tiny_model(), top_k=0)


def test_boolean_flags_show_as_flags() -> None:
    for command in ("profile", "split", "train"):
        res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        force = next(line for line in res.output.splitlines() if "--force" in line)
        assert "<bool>" not in force and "BOOLEAN" not in force


def test_a_slow_split_without_a_flop_budget_warns(capsys) -> None:
    from cli.split import _print_summary

    plan = recon.SplitPlan(tasks=TASKS, layers=[], extra={"branches": {}, "params_before": 10, "params_after": 10})
    _print_summary(plan, 3.5)
    err = capsys.readouterr().err
    assert "3.50x the time per step; bound it with --budget-flops" in err
    plan.budget_flops = 1.3
    _print_summary(plan, 3.5)
    assert "--budget-flops" not in capsys.readouterr().err
