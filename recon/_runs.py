"""The run folder (docs/run-folder.md): ``runs/<name>/`` with ``run.json`` and one sub-folder per stage.

``recon split`` and ``recon report`` find the most recent run by itself; no command overwrites another run's
results unless ``--force``.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recon import _io, _lock
from recon._errors import ReconError

RUNS_ROOT = Path("runs")
RUN_FILE = "run.json"


#: Optional packages whose version run.json records when they are installed (read from metadata, not imported).
OPTIONAL_PACKAGES = ("torchjd", "lightning", "transformers")


def versions() -> dict[str, str]:
    """recon's, Python's and torch's versions, and those of the optional packages that are installed."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from recon import __version__

    out = {"recon": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in OPTIONAL_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # not installed: an optional extra (README, "Install extras and tests")
            continue
    return out


@dataclass
class Run:
    """One run folder. ``info`` mirrors ``run.json``."""

    dir: Path
    info: dict[str, Any]

    @classmethod
    def create(
        cls,
        *,
        recipe: str | Path,
        tasks: list[str],
        seed: int,
        out: str | Path | None = None,
        root: str | Path = RUNS_ROOT,
    ) -> Run:
        """A new run folder: ``out`` if given (it may exist: stages inside it are guarded), else a fresh name."""
        if out is not None:
            run_dir = Path(out)
        else:
            root = Path(root)
            stem = Path(recipe).stem
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = root / f"{stem}-{stamp}"
            n = 1
            while run_dir.exists():
                n += 1
                run_dir = root / f"{stem}-{stamp}-{n}"
        with _lock.updating(run_dir / RUN_FILE):  # two commands creating one run folder: one creates, one opens
            if (run_dir / RUN_FILE).exists():
                run = cls.open(run_dir)
                if run.info.get("tasks") != list(tasks):
                    raise ReconError(
                        f"{run_dir} holds a run for tasks {run.info.get('tasks')}, not {list(tasks)}; "
                        "pass another --out"
                    )
                return run
            info = {
                "recipe": str(Path(recipe).resolve()),
                "tasks": list(tasks),
                "seed": seed,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "created_unix": time.time(),
                "versions": versions(),
                "commands": [],
            }
            run = cls(run_dir, info)
            run.save()
        return run

    @classmethod
    def open(cls, path: str | Path | None = None, *, root: str | Path = RUNS_ROOT) -> Run:
        """The run at ``path``, or the most recent one under ``root`` when ``path`` is None."""
        if path is None:
            path = latest_run(root)
        path = Path(path)
        file = path / RUN_FILE
        if not file.exists():
            raise ReconError(f"{path} is not a run folder (no {RUN_FILE}); pass a folder made by `recon profile`")
        return cls(path, _read_info(file))

    @classmethod
    def for_recipe(
        cls,
        recipe: str | Path,
        *,
        tasks: list[str],
        seed: int,
        out: str | Path | None = None,
        root: str | Path = RUNS_ROOT,
    ) -> Run:
        """``out`` if given, else the latest run under ``root`` made from the same recipe, else a new run."""
        found = cls.find(recipe, out=out, root=root)
        if found is not None and out is None:
            return cls.open(found)
        return cls.create(recipe=recipe, tasks=tasks, seed=seed, out=out, root=root)

    @staticmethod
    def find(recipe: str | Path, *, out: str | Path | None = None, root: str | Path = RUNS_ROOT) -> Path | None:
        """The run folder :meth:`for_recipe` would use if it exists (``out``, else the latest run of the recipe),
        without creating anything; None when there is none yet."""
        if out is not None:
            return Path(out) if (Path(out) / RUN_FILE).exists() else None
        target = Path(recipe).resolve()
        mine = [(key, d) for key, d, info in _runs_under(root) if Path(info.get("recipe", "")) == target]
        return max(mine)[1] if mine else None

    @property
    def recipe(self) -> Path:
        return Path(self.info["recipe"])

    @property
    def tasks(self) -> list[str]:
        return list(self.info["tasks"])

    def save(self) -> None:
        _io.write_json(self.dir / RUN_FILE, self.info)

    def record_command(self, argv: list[str] | None = None, **details: Any) -> None:
        """Append the command line that writes into this run (and ``details``, e.g. the method's spec) to
        ``run.json``: re-read under its lock, so two commands writing into one run both stay recorded."""
        argv = list(sys.argv if argv is None else argv)
        if argv:
            argv[0] = Path(argv[0]).name
        entry = {"argv": argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **details}
        with _lock.updating(self.dir / RUN_FILE):
            file = self.dir / RUN_FILE
            if file.exists():
                self.info = _read_info(file)
            self.info.setdefault("commands", []).append(entry)
            self.save()

    def hold(self, folder: str | Path) -> None:
        """Lock ``folder`` (inside this run) for the rest of the command, as :meth:`stage` does, keeping what it
        holds (``--resume``)."""
        _lock.hold(folder)

    def stage(self, *parts: str, force: bool = False) -> Path:
        """The folder of a stage (``profile``, ``split``, ``train/<label>``), guarded against overwrite and locked
        for the rest of the command: a second command on the same stage gets a :class:`ReconError` naming the
        holder (docs/run-folder.md, "One writer per folder")."""
        folder = self.dir.joinpath(*parts)
        _lock.hold(folder)
        if folder.exists() and any(folder.iterdir()):
            if not force:
                raise ReconError(
                    f"{folder} already holds results; pass --force to overwrite them or --out for another run"
                )
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def save_summary(
        self, folder: str | Path, result: Any, *, tasks: list[str], delta_m: bool = True
    ) -> dict[str, Any]:
        """Write ``summary.json`` of a trained variant (a ``recon.TrainResult``) into ``folder``, and return it.

        With ``delta_m``, Δm% against the run's ``single-<task>`` variants is added when every task has one
        (docs/run-folder.md, "summary.json").
        """
        from recon._train import SUMMARY, load_baselines
        from recon._train import delta_m as compute_delta_m

        summary = dict(result.summary)
        baseline = load_baselines(self.dir / "train", tasks)
        if delta_m and baseline is not None and result.final:
            summary["delta_m"] = compute_delta_m(result.final, baseline, summary["directions"])
            summary["baseline"] = "single-task"
        _io.write_json(Path(folder) / SUMMARY, summary)
        return summary

    def summaries(self) -> dict[str, dict[str, Any]]:
        """``{label: summary}`` of every ``train/<label>/summary.json`` in this run, by label."""
        from recon._train import SUMMARY

        files = sorted((self.dir / "train").glob(f"*/{SUMMARY}"))
        return {file.parent.name: json.loads(file.read_text()) for file in files}


def _read_info(file: Path) -> dict[str, Any]:
    """``run.json`` as a dict, or a :class:`ReconError` naming the file and the fix."""
    try:
        info = json.loads(file.read_text())
        float(info.get("created_unix", 0.0))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
        reason = f"not valid run.json: {e}"
    except OSError as e:
        reason = e.strerror or type(e).__name__
    else:
        return info
    raise ReconError(
        f"{file} cannot be read ({reason}); repair or remove {file.parent}, or pass another run folder explicitly"
    ) from None


def _runs_under(root: str | Path) -> list[tuple[tuple[float, str], Path, dict[str, Any]]]:
    """Every run folder under ``root``: ((creation time, name), folder, run.json). An unreadable run.json is an
    error naming it, never skipped: skipping it would silently send "latest" to an older run."""
    root = Path(root)
    found = []
    for file in sorted(root.glob(f"*/{RUN_FILE}")) if root.is_dir() else []:
        info = _read_info(file)
        found.append(((float(info.get("created_unix", 0.0)), file.parent.name), file.parent, info))
    return found


def latest_run(root: str | Path = RUNS_ROOT) -> Path:
    """The most recently created run under ``root`` (by the creation time recorded in ``run.json``)."""
    runs = _runs_under(root)
    if not runs:
        raise ReconError(
            f"no run found in {Path(root)}/; run `recon profile MODEL_PY` first, or pass the run folder explicitly"
        )
    return max(runs, key=lambda run: run[0])[1]
