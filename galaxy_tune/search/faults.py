"""What a search does about faults: a stop signal, a crashed trial or a lost node, a killed driver.

- `GracefulStop`: SIGTERM and SIGUSR1 (what Slurm and Kubernetes send before a kill) let each running trial
  checkpoint at the end of its epoch, for at most `STOP_GRACE_S`, then stop the search as Ctrl-C does.
- `SayRetries` and `retried`: which trials Ray retried, and why (their node lost, or their own error).
- `KeepReportsOnRetry`: a trial retried from its checkpoint keeps the reports of its failed run.
- `PruneCheckpoints`: checkpoints pruned only once a killed driver's state can no longer name them.
- `check_ray_state`: a Ray state file cut short by a kill is refused, not silently started over; a searcher's state
  copied before or after the trials' is made to agree with them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.fs
from ray import cloudpickle, tune
from ray.tune.result import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE

from .. import layout
from ..data.tasks import Task
from ..errors import GalaxyTuneError
from ..signals import STOP_SIGNALS

STOP_GRACE_S = 60.0  # how long running trials get to reach their epoch's end and checkpoint after a stop signal
# In the experiment folder (or beside it in the storage) while trials are asked to checkpoint at their epoch's end
STOP_MARKER = ".stop-requested"
RAY_STATE = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")  # the newest is read


@dataclass(frozen=True)
class StopMark:
    """The search's "checkpoint at your epoch's end": a file in the experiment folder, or with --storage an object
    beside Ray's in the storage, which every node sees (they may share no folder with the driver)."""

    path: str
    filesystem: pyarrow.fs.FileSystem = field(default_factory=pyarrow.fs.LocalFileSystem)

    def set(self) -> None:
        self.filesystem.open_output_stream(self.path).close()

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_file(self.path)

    def is_set(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pyarrow.fs.FileType.NotFound


class GracefulStop(tune.Callback):
    """SIGTERM or SIGUSR1 while Ray Tune runs: each running trial checkpoints at the end of its epoch (it sees
    STOP_MARKER), then Ray's own stop ends the search: it saves its state, and the trials keep those checkpoints.
    After STOP_GRACE_S the search stops with the checkpoints it has. A second signal stops it at once (Ray's
    stop); a third raises KeyboardInterrupt. Ctrl-C stays Ray's: an immediate stop."""

    def __init__(self, marker: StopMark):
        self.marker = marker
        self.stops = 0  # signals taken, and the stop at the grace's end
        self.deadline = 0.0
        self.waiting: set[str] | None = None
        self.ray_stop = None

    def __getstate__(self):  # Ray pickles its callbacks with the experiment; the signal state is this run's
        return {**self.__dict__, "stops": 0, "waiting": None, "ray_stop": None}

    def setup(self, **info):
        self.marker.clear()
        if threading.current_thread() is not threading.main_thread():
            return
        self.ray_stop = signal.getsignal(signal.SIGUSR1)  # Ray Tune's, installed as its run began
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.request)

    def request(self, signum, frame):
        self.stops += 1
        if self.stops > 2 or not callable(self.ray_stop):
            raise KeyboardInterrupt
        if self.stops == 2:
            self.stop_now()
            return
        self.marker.set()
        self.deadline = time.monotonic() + STOP_GRACE_S
        print(f"{signal.Signals(signum).name}: each running trial checkpoints at the end of its epoch (at most "
              f"{STOP_GRACE_S:.0f} s), then the search stops; send it again to stop at once", file=sys.stderr)

    def stop_now(self):
        self.marker.clear()
        self.ray_stop(signal.SIGUSR1, None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.waiting is not None:
            self.waiting.discard(trial.trial_id)

    on_trial_error = on_checkpoint = on_trial_complete  # a trial that ended or checkpointed is no longer waited for

    def on_experiment_end(self, trials, **info):  # also after a Ctrl-C that came during the grace
        self.marker.clear()

    def on_step_end(self, iteration, trials, **info):
        if self.stops != 1:
            return
        if self.waiting is None:
            self.waiting = {t.trial_id for t in trials if t.status == "RUNNING"}
        if not self.waiting or time.monotonic() > self.deadline:
            self.stops += 1  # stopped: a further signal is a KeyboardInterrupt
            self.stop_now()


NODE_LOST = "node lost"
ERROR_FILE = "error.txt"  # Ray's, in a trial folder: a "Failure # N" block per failure


def failure_cause(text: str) -> str:
    """Why a trial's run failed, from Ray's error text: its node was lost, or its own code raised."""
    return NODE_LOST if "because its node has died" in text else "error"


class SayRetries(tune.Callback):
    """A line for each trial Ray retries: why it failed (its node lost, or its own error), and from where."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures

    def on_trial_recover(self, iteration, trials, trial, **info):
        errors = Path(trial.error_file) if trial.error_file else None  # in the driver's staging folder, up to date
        failures = errors.read_text().split("Failure # ") if errors and errors.is_file() else [""]
        why = "its node was lost" if failure_cause(failures[-1]) == NODE_LOST else "it failed"
        start = "its last checkpoint" if trial.checkpoint else "the start"
        print(f"trial {trial.trial_id}: {why}; retried from {start} (failure {trial.run_metadata.num_failures}, "
              f"--max-failures {self.max_failures})")


class KeepReportsOnRetry(tune.Callback):
    """A trial retried from its checkpoint keeps the reports of its failed run in result.json and progress.csv.

    Ray's retry reads these files back from the experiment folder, which it updates only every few seconds or
    more: a trial that failed soon after a report would lose the reports since. The driver's staging folder holds
    them up to date, so they are copied to the experiment folder first.
    """

    def on_trial_recover(self, iteration, trials, trial, **info):
        if not trial.checkpoint:  # a retry from the start keeps the staging folder's files as they are
            return
        filesystem = trial.storage.storage_filesystem
        for name in (EXPR_RESULT_FILE, EXPR_PROGRESS_FILE):
            staged = Path(trial.local_path, name)
            if not staged.is_file():
                continue
            try:
                pyarrow.fs.copy_files(str(staged), Path(trial.storage.trial_fs_path, name).as_posix(),
                                      destination_filesystem=filesystem)
            except OSError as err:  # the retry goes on, as it would without this copy
                print(f"warning: trial {trial.trial_id}: its {name} could not be brought up to date before its "
                      f"retry ({err}); it may miss reports of its failed run", file=sys.stderr)


def retried(trials: pd.DataFrame) -> list[dict]:
    """best.json's list of the trials Ray retried after a failure, with the cause of each failure."""
    out = []
    for trial_id, folder in zip(trials["trial_id"], trials["path"]):
        errors = Path(folder) / ERROR_FILE
        if errors.is_file():
            failures = re.split(r"^Failure # \d+ ", errors.read_text(), flags=re.M)[1:]
            out.append({"trial_id": trial_id, "failures": [failure_cause(f) for f in failures]})
    return out


class PruneCheckpoints(tune.Callback):
    """Keep only the best and the latest checkpoint of each finished trial, as soon as that is safe.

    Ray's own `num_to_keep` deletes checkpoints before its experiment snapshot records the newer ones, so a
    driver killed in between leaves a snapshot pointing at a deleted checkpoint and `--resume` fails. A running
    trial therefore keeps every checkpoint; a finished one is pruned once two snapshots written after it
    finished are on disk (they record it as finished, so it is never resumed).
    """

    def __init__(self, experiment: Path, task: Task):
        self.experiment, self.task = experiment, task
        self.waiting: dict[str, tuple[Path, float, int]] = {}  # trial id -> (folder, snapshot time, changes)

    def snapshot_time(self) -> float:
        return max((p.stat().st_mtime for p in self.experiment.glob("experiment_state-*.json")), default=0.0)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.waiting[trial.trial_id] = (Path(trial.path), self.snapshot_time(), 0)  # not local_path: staging

    def on_step_end(self, iteration, trials, **info):
        if not self.waiting:
            return
        now = self.snapshot_time()
        for trial_id, (folder, seen, changes) in list(self.waiting.items()):
            if now > seen:
                seen, changes = now, changes + 1
            if changes >= 2:
                prune_checkpoints(folder, self.task)
                del self.waiting[trial_id]
            else:
                self.waiting[trial_id] = (folder, seen, changes)


def prune_checkpoints(trial_folder: Path, task: Task, filesystem: pyarrow.fs.FileSystem | None = None,
                      stored: str | None = None) -> None:
    """Delete a finished trial's checkpoints but its best (by the task's val metric) and its latest. Its reports
    are read in `trial_folder`; its checkpoints are there too, or at `stored` in `filesystem` (object storage)."""
    filesystem, stored = filesystem or pyarrow.fs.LocalFileSystem(), stored or str(trial_folder)
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(stored, allow_not_found=True))
    checkpoints = sorted(i.base_name for i in found if i.type == pyarrow.fs.FileType.Directory
                         and i.base_name.startswith("checkpoint_"))
    if len(checkpoints) <= 2:
        return
    metric = task.val_metric
    reports = [r for r in layout.trial_reports(trial_folder) if metric in r and r.get("checkpoint_dir_name")]
    if not reports:
        return
    best = reports[task.arg_best([r[metric] for r in reports])]["checkpoint_dir_name"]
    for checkpoint in checkpoints[:-1]:
        if checkpoint != best:
            try:
                filesystem.delete_dir(f"{stored}/{checkpoint}")
            except OSError:  # gone already: pruned by an earlier pass
                pass


def check_ray_state(experiment: Path, ray_path: str | None = None,
                    filesystem: pyarrow.fs.FileSystem | None = None) -> None:
    """Refuse an experiment (at `ray_path` in `filesystem`) whose newest Ray state file was cut short, and make its
    searcher's state agree with its trials'. Ray saves its state in a staging folder and then copies it to the
    experiment's folder or the storage, file by file. A kill during the copy leaves a short file (Ray's restore
    would then start the whole search over), or a searcher's state older or newer than the trials' (Ray would then
    create a trial too many or too few, or fail on a trial its searcher does not know)."""
    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    saved = newest_ray_state(filesystem, ray_path or str(experiment))
    state = {}
    for pattern, (path, data) in saved.items():
        try:
            state[pattern] = json.loads(data) if pattern.startswith("experiment") else cloudpickle.loads(data)
        except Exception:
            raise GalaxyTuneError(f"{path} is cut short (the search was killed while Ray copied it there): Ray "
                                  "cannot continue this search. Its finished trials stay in trials.csv and optuna.db "
                                  "(`retrain --from` and `report` read them); start a new search with another "
                                  "--name") from None
    if len(state) < len(RAY_STATE):
        return
    trials, generator, optuna = (state[pattern] for pattern in RAY_STATE)
    if match_searcher([json.loads(trial) for trial, _ in trials["trial_data"]], generator, optuna):
        print(f"{experiment}: the search was killed while Ray copied its state, so its searcher's state did not "
              "match its trials; it now does")
        for pattern, value in zip(RAY_STATE[1:], (generator, optuna)):
            with filesystem.open_output_stream(saved[pattern][0]) as out:
                out.write(cloudpickle.dumps(value))


def newest_ray_state(filesystem: pyarrow.fs.FileSystem, folder: str,
                     patterns: tuple[str, ...] = RAY_STATE) -> dict[str, tuple[str, bytes]]:
    """Of each pattern, the file Ray reads in `folder` (the greatest name) as (path, bytes); none for a pattern
    without a file, or a folder not made yet."""
    names = [info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(folder,
                                                                                          allow_not_found=True))]
    saved = {}
    for pattern in patterns:
        if newest := max(fnmatch.filter(names, pattern), default=None):
            with filesystem.open_input_stream(f"{folder}/{newest}") as source:
                saved[pattern] = f"{folder}/{newest}", source.read()
    return saved


def match_searcher(trials: list[dict], generator: dict, optuna: dict) -> bool:
    """Make Ray's saved search generator and OptunaSearch (`generator`, `optuna`: their states) agree with the saved
    `trials`: as many trials created, the unfinished ones live and known to Optuna. Whether anything changed."""
    unfinished = [trial for trial in trials if trial["status"] not in ("TERMINATED", "ERROR")]
    unknown = [trial for trial in unfinished if trial["trial_id"] not in optuna["_ot_trials"]]
    for trial in unknown:  # as OptunaSearch asks for its points_to_evaluate
        optuna["_ot_study"].enqueue_trial(trial.get("evaluated_params") or {})
        ot_trial = optuna["_ot_study"].ask()
        optuna["_space"](ot_trial)
        optuna["_ot_trials"][trial["trial_id"]] = ot_trial
    limiter = generator.get("name:ConcurrencyLimiter", {})
    live = {trial["trial_id"] for trial in unfinished}
    changed = bool(unknown) or generator["counter"] != len(trials) or limiter.get("live_trials", live) != live
    generator["counter"] = len(trials)
    if limiter:
        limiter["live_trials"], limiter["num_unfinished_live_trials"] = live, len(live)
    return changed
