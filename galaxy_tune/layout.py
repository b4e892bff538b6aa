"""The results layout: the file names every command writes and reads, and Ray's per-trial reports.

A leaf module (no torch, Ray or Optuna), so a reader such as `report` never imports the code that wrote a file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import GalaxyTuneError

RESULTS_DIR = Path("results")  # the default --results-dir
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # an experiment's --name: one folder name inside it
# A search experiment, results/<name>/
SEARCH_OPTIONS = "search.json"  # what the search was asked to do (read back by --resume)
SPACE = "space.yaml"  # a copy of the space searched (read back by --resume)
TRIALS = "trials.csv"  # one row per trial
BEST = "best.json"  # the best trial's config and provenance
STUDY = "optuna.db"  # the search as an Optuna study, for optuna-dashboard
# A retrain, results/retrain-<time>/ (or results/<name>/)
RETRAIN_PLAN = "plan.json"  # what the retrain was asked to do, written first (checked by --resume)
RETRAIN_RUNS = "runs"  # <method>-seed<S>.json and .csv: each finished run's test_results row and predictions
RETRAIN = "retrain.json"  # what was retrained, on which data
TEST_RESULTS = "test_results.csv"  # one row per (method, seed)
TEST_PREDICTIONS = "test_predictions.csv"  # one row per (method, seed, test galaxy)
REPORT = "report.md"
HF_FOLDER = "hf"  # in each retrained <method>-seed<S>/: the exported model
EVALUATION = "test_evaluation.csv"  # written by the report: one row per (method, rank, seed)
# Ray Tune's own file in each trial folder: one JSON line per tune.report
RAY_RESULT = "result.json"


def run_folder(method: str, rank: int) -> str:
    """A retrained config's folder name before -seed<S>: a search's best config keeps the plain method name."""
    return method if rank == 1 else f"{method}-top{rank}"


def check_name(name: str) -> None:
    """Refuse an experiment name that is not one folder name of safe characters (it could write elsewhere)."""
    if not NAME.fullmatch(name):
        raise GalaxyTuneError(f"--name {name!r} is not allowed: a name is one folder name inside --results-dir, "
                              "of letters, digits and . _ + - (first a letter or digit, at most 100), e.g. lora-1")


def trial_reports(trial_dir: Path) -> list[dict]:
    """Every `tune.report` of a trial, in order, from its result.json ([] when there is none yet).

    A line cut short by a killed process is skipped: Ray appends one JSON object per line.
    """
    path = Path(trial_dir) / RAY_RESULT
    if not path.is_file():
        return []
    reports = []
    for line in path.read_text().splitlines():
        try:
            reports.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return reports


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` at once: a reader (or a killed writer) sees the old file or the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


@contextmanager
def new_folder(path: Path, exist_ok: bool = True) -> Iterator[Path]:
    """Make `path` and its missing parents for the work inside; on an error or Ctrl-C there, remove those of them
    that are still empty, so a refused or failed command leaves no empty folder behind.

    With exist_ok False an existing `path` raises FileExistsError: mkdir is atomic, so of two commands claiming
    one folder at once exactly one gets it.
    """
    path = Path(path)
    made = [folder for folder in (path, *path.parents) if not folder.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=exist_ok)
    try:
        yield path
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # something was written there: keep it, and its parents
                break
        raise
