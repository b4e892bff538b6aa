"""Watching a running search: optuna.db, trials.csv and best.json grow while trials finish.

Ray's OptunaSearch keeps its own study in memory: a live sqlite storage in the searcher would be newer than
the searcher state Ray saves, and `Tuner.restore` would break. The study users open (`optuna-dashboard`,
`optuna.load_study`) is therefore a separate one, mirrored trial by trial by `StudyMirror`, a Ray Tune callback
in the driver: a trial appears with its parameters as RUNNING when it starts, gains each epoch's val metric
(the task's: accuracy, or RMSE) as an intermediate value, and ends COMPLETE (every epoch), PRUNED (stopped
early by ASHA) or FAIL. Each write is one sqlite transaction, so a driver killed mid-write leaves a readable
database. A resumed driver recognises the trials it mirrored (user attribute `ray_trial_id`), finishes or adds
the ones Ray ran while the mirror was not looking, and marks FAIL those Ray lost with the kill (started after its
last snapshot).
When the search ends `finish_study` makes the study equal to what Ray ran, one trial per Ray trial: in place
when the mirror agrees with Ray's results, else by rebuilding it in a new file swapped in atomically.

`LiveTables` rewrites trials.csv and best.json (`"running": true`) atomically whenever a trial finishes;
`write_results` (`search.run`) writes the final ones (`"running": false`, `"complete"`: whether every trial ran).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState
from ray import tune

from .. import layout
from ..layout import write_atomically
from .space import SearchSpace
from ..data.tasks import TASKS, Task
from ..train_config import TrainConfig

METRICS = tuple(dict.fromkeys(task.val_metric for task in TASKS.values()))  # val_accuracy, val_rmse
KEPT = ("epoch", *METRICS, "epoch_seconds", "node_id", "device")  # what the tables and the study need of a report
FINISHED = ("COMPLETED", "STOPPED")  # trials.csv statuses of trials that ran to their end


def by_epoch(reports: list[dict], metric: str) -> list[dict]:
    """One report per epoch, in epoch order: the last of each (a trial resumed after a crash may repeat one)."""
    latest = {}
    for report in reports:
        if report.get("epoch") is not None and report.get(metric) is not None:
            latest[int(report["epoch"])] = report
    return [latest[epoch] for epoch in sorted(latest)]


def ended_status(config: dict, epochs: int) -> str:
    """How a trial that Ray calls TERMINATED ended: COMPLETED (every epoch) or STOPPED (early, by the scheduler)."""
    return "COMPLETED" if epochs >= TrainConfig.from_dict(config).epochs else "STOPPED"


def trial_row(trial_id: str, config: dict, reports: list[dict], state: str, path: str | None, task: Task) -> dict:
    """A trials.csv row from a trial's reports in arrival order: best_, last_ and the curve of the task's val
    metric (best_val_accuracy, or best_val_rmse, ...).

    `state` is Ray's: TERMINATED becomes COMPLETED (every epoch) or STOPPED (early, by ASHA); any other
    (ERROR, UNFINISHED, RUNNING, PENDING) is the row's status as it is.
    """
    metric = task.val_metric
    history = by_epoch(reports, metric)
    train_config = TrainConfig.from_dict(config)
    epochs = int(history[-1]["epoch"]) if history else 0
    status = state if state != "TERMINATED" else ended_status(config, epochs)
    values = np.array([float(r[metric]) for r in history])
    curve = values.round(6).tolist()
    best = task.arg_best(values) if curve else None
    return {"trial_id": trial_id, "status": status, "epochs": epochs,
            f"best_{metric}": curve[best] if curve else float("nan"),
            "best_epoch": int(history[best]["epoch"]) if curve else 0,
            f"last_{metric}": curve[-1] if curve else float("nan"),
            "train_seconds": round(float(np.sum([float(r.get("epoch_seconds", 0.0)) for r in history])), 2)
            if curve else 0.0,
            "node_id": reports[-1].get("node_id") if reports else None,
            "device": reports[-1].get("device") if reports else None,
            **{k: v for k, v in train_config.searched().items() if k != "epochs"},  # epochs: run, above
            "config": json.dumps(train_config.to_dict()),
            f"{metric}_curve": json.dumps(curve), "path": path}


def best_record(trials: pd.DataFrame, about: dict, run: dict, task: Task, *, running: bool,
                complete: bool) -> dict | None:
    """best.json: the best finished trial (by its best val metric, then epochs) with the search's facts; None
    while no trial has finished. `running`: the driver is still at work; `complete`: every trial ran."""
    finished = trials[trials["status"].isin(FINISHED)]
    if finished.empty:
        return None
    best = task.rank(finished).iloc[0]
    return {"method": about["method"], "config": TrainConfig.from_dict(json.loads(best["config"])).to_dict(),
            "metric": task.val_metric, "mode": task.mode,
            task.val_metric: float(best[f"best_{task.val_metric}"]), "epoch": int(best["best_epoch"]),
            "trial_id": best["trial_id"], **{k: v for k, v in about.items() if k not in ("method", "versions")},
            **run, "versions": about["versions"], "running": running, "complete": complete,
            "finished_trials": len(finished), "updated": datetime.datetime.now().isoformat(timespec="seconds")}


def write_tables(experiment: Path, trials: pd.DataFrame, about: dict, run: dict, task: Task, *, running: bool,
                 complete: bool) -> dict | None:
    """trials.csv, and best.json once a trial finished, each replaced atomically; returns best.json's content."""
    write_atomically(experiment / layout.TRIALS, trials.to_csv(index=False))
    best = best_record(trials, about, run, task, running=running, complete=complete)
    if best is not None:
        write_atomically(experiment / layout.BEST, json.dumps(best, indent=2))
    return best


def study_trial(space: SearchSpace, config: dict, reports: list[dict], task: Task, *, failed: bool,
                ray_trial_id: str, path: str | None) -> FrozenTrial:
    """A finished trial as the study holds it: FAIL (an error, or no epoch), PRUNED (stopped before its last
    epoch) or COMPLETE (valued by its best val metric), each epoch's val metric an intermediate value."""
    curve = {int(r["epoch"]): float(r[task.val_metric]) for r in by_epoch(reports, task.val_metric)}
    stopped = bool(curve) and ended_status(config, max(curve)) == "STOPPED"
    state = (TrialState.FAIL if failed or not curve else TrialState.PRUNED if stopped else TrialState.COMPLETE)
    values = list(curve.values())
    searched = space.distributions(config)
    return optuna.trial.create_trial(
        params={k: config[k] for k in searched}, distributions=searched, intermediate_values=curve, state=state,
        value=values[task.arg_best(values)] if state == TrialState.COMPLETE else None,
        user_attrs={"ray_trial_id": ray_trial_id, "ray_trial_path": path, "epochs": len(curve)})


def open_storage(path: Path) -> optuna.storages.RDBStorage:
    # A reader such as optuna-dashboard may hold the file a moment: wait for it rather than fail the write.
    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 30}})


def storage_ids(storage: optuna.storages.RDBStorage, name: str) -> tuple[int, dict[str, tuple[int, FrozenTrial]]]:
    """The study's id, and its trials by Ray trial id: (storage trial id, trial); the first of any duplicate."""
    study_id = storage.get_study_id_from_name(name)
    mirrored: dict[str, tuple[int, FrozenTrial]] = {}
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        ray_id = trial.user_attrs.get("ray_trial_id")
        if ray_id is not None and ray_id not in mirrored:
            mirrored[ray_id] = (storage.get_trial_id_from_study_id_trial_number(study_id, trial.number), trial)
    return study_id, mirrored


def settle(storage: optuna.storages.RDBStorage, trial_id: int, current: FrozenTrial, final: FrozenTrial) -> None:
    """Give an unfinished trial its final intermediate values and attributes, then (last) its final state."""
    write_intermediate_values(storage, trial_id, current, final)
    for key, value in final.user_attrs.items():
        if current.user_attrs.get(key) != value:
            storage.set_trial_user_attr(trial_id, key, value)
    storage.set_trial_state_values(trial_id, final.state, final.values)


def write_intermediate_values(storage: optuna.storages.RDBStorage, trial_id: int, current: FrozenTrial,
                              final: FrozenTrial) -> None:
    """Write the epochs' values of `final` that the stored `current` lacks or holds otherwise; note them in it."""
    for step, value in final.intermediate_values.items():
        if current.intermediate_values.get(step) != value:
            storage.set_trial_intermediate_value(trial_id, step, value)
            current.intermediate_values[step] = value


def same_trial(a: FrozenTrial, b: FrozenTrial) -> bool:
    return (a.state, a.values, a.params, a.intermediate_values, a.user_attrs) == \
        (b.state, b.values, b.params, b.intermediate_values, b.user_attrs)


def finish_study(path: Path, name: str, final: list[FrozenTrial], direction: str) -> str:
    """Make the study at `path` hold exactly `final` (one finished trial per Ray trial, Ray's order for new ones).

    In place ("updated") when every mirrored trial is one of `final` and the finished ones already equal it:
    the unfinished are settled and the missing added. Otherwise ("rebuilt": a trial Ray lost with a killed
    driver, a failed trial Ray ran again on --resume, no study yet) the study is written to a new file that
    replaces the old one atomically. Returns which of the two happened.
    """
    if path.is_file():
        try:
            storage = open_storage(path)
            try:
                if optuna.get_all_study_names(storage) == [name] and update_in_place(storage, name, final):
                    return "updated"
            finally:
                storage.engine.dispose()
        except Exception as err:  # an unreadable mirror: the rebuild below replaces it
            print(f"galaxy_tune: rebuilding {path} ({type(err).__name__}: {err})", file=sys.stderr)
    rebuilt = path.with_name(f".{path.name}.new")
    rebuilt.unlink(missing_ok=True)
    storage = open_storage(rebuilt)
    optuna.create_study(study_name=name, storage=storage, direction=direction).add_trials(final)
    storage.engine.dispose()
    os.replace(rebuilt, path)
    return "rebuilt"


def update_in_place(storage: optuna.storages.RDBStorage, name: str, final: list[FrozenTrial]) -> bool:
    wanted = {t.user_attrs["ray_trial_id"]: t for t in final}
    study_id, mirrored = storage_ids(storage, name)
    if len(mirrored) != len(storage.get_all_trials(study_id, deepcopy=False)) or not set(mirrored) <= set(wanted):
        return False  # a trial without a Ray id, a duplicate, or one Ray did not run
    for ray_id, (_, trial) in mirrored.items():
        if trial.state.is_finished() and not same_trial(trial, wanted[ray_id]):
            return False
        if not trial.state.is_finished() and (set(trial.intermediate_values) - set(wanted[ray_id].intermediate_values)
                                              or trial.params != wanted[ray_id].params):
            return False
    for ray_id, (trial_id, trial) in mirrored.items():
        if not trial.state.is_finished():
            settle(storage, trial_id, trial, wanted[ray_id])
    for ray_id, trial in wanted.items():
        if ray_id not in mirrored:
            storage.create_new_trial(study_id, template_trial=trial)
    return True


def trial_path(trial) -> str | None:
    """A Ray trial's folder in the experiment (Result.path), or None before Ray named it (a pending trial)."""
    return trial.path if trial.relative_logdir else None


class TrialWatcher(tune.Callback):
    """Follows each trial's reports as Ray delivers them (a resumed driver starts from the trial's result.json).

    Ray's own result.json in the experiment folder lags (the driver writes it in a staging folder and syncs it
    in batches), so the reports kept here are what the watchers below build on.
    """

    kept = KEPT  # what is kept of each report

    def __init__(self):
        self.reports: dict[str, list[dict]] = {}

    def setup(self, **info):
        self.reports = {}

    def seen(self, trial) -> list[dict]:
        if trial.trial_id not in self.reports:
            saved = layout.trial_reports(Path(trial_path(trial))) if trial_path(trial) else []
            self.reports[trial.trial_id] = [{k: r[k] for k in self.kept if k in r} for r in saved]
        return self.reports[trial.trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen(trial).append({k: result[k] for k in self.kept if k in result})


class StudyMirror(TrialWatcher):
    """Mirror every Ray trial into the Optuna study at `path` as it runs (see the module's docstring)."""

    def __init__(self, path: Path, name: str, space: SearchSpace, task: Task):
        super().__init__()
        self.path, self.name, self.space, self.task = Path(path), name, space, task
        self.storage = None

    def __getstate__(self):  # Ray pickles the callbacks with the Tuner; a resumed driver opens its own storage
        return {**self.__dict__, "storage": None, "reports": {}}

    def setup(self, **info):
        super().setup(**info)
        self.storage, self.in_sync, self.warned = None, False, False
        self.study_id, self.mirrored = None, {}  # Ray trial id -> (storage trial id, trial as last written)
        try:  # the study exists from the start, so optuna-dashboard can be opened at once
            self.open()
        except Exception:
            self.storage = None  # tried again at the first trial event, which warns if it fails

    def open(self) -> None:
        if self.storage is None:
            storage = open_storage(self.path)
            optuna.create_study(study_name=self.name, storage=storage, direction=self.task.direction,
                                load_if_exists=True)
            self.storage = storage

    def guarded(self, trials, action) -> None:
        """Run one mirror update; on any failure warn once and resynchronise at the next event (a mirror
        problem must not stop the search: the study is made whole when it ends)."""
        try:
            if not self.in_sync:
                self.sync(trials)
            action()
        except Exception as err:
            self.in_sync = False
            if not self.warned:
                self.warned = True
                print(f"galaxy_tune: the live Optuna study {self.path} missed an update ({type(err).__name__}: "
                      f"{err}); it is retried, and the study is completed when the search ends", file=sys.stderr)

    def sync(self, trials) -> None:
        """Bring the mirror level with Ray's trials (the first event of a driver, and after a failed write)."""
        self.open()
        self.study_id, self.mirrored = storage_ids(self.storage, self.name)
        ray_ids = {t.trial_id for t in trials}
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                self.finish(trial, failed=trial.status == "ERROR")
            elif trial.trial_id in self.mirrored or self.seen(trial):  # started in an earlier driver
                self.start(trial)
        for ray_id, (trial_id, trial) in list(self.mirrored.items()):
            if ray_id not in ray_ids and not trial.state.is_finished():  # started after Ray's last snapshot
                self.storage.set_trial_user_attr(trial_id, "lost", "the driver was killed before Ray saved this "
                                                 "trial; --resume ran others instead")
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        self.in_sync = True

    def start(self, trial) -> None:
        """A RUNNING trial with the trial's parameters and the epochs it reported so far (once)."""
        final = study_trial(self.space, trial.config, self.seen(trial), self.task, failed=False,
                            ray_trial_id=trial.trial_id, path=trial_path(trial))
        if trial.trial_id not in self.mirrored:
            running = optuna.trial.create_trial(
                state=TrialState.RUNNING, params=final.params, distributions=final.distributions,
                intermediate_values=final.intermediate_values,
                user_attrs={k: final.user_attrs[k] for k in ("ray_trial_id", "ray_trial_path")})
            trial_id = self.storage.create_new_trial(self.study_id, template_trial=running)
            self.mirrored[trial.trial_id] = (trial_id, running)
            return
        trial_id, current = self.mirrored[trial.trial_id]
        if not current.state.is_finished():
            write_intermediate_values(self.storage, trial_id, current, final)

    def finish(self, trial, *, failed: bool) -> None:
        """The trial's final state (if the mirror has not recorded one already)."""
        if trial.trial_id in self.mirrored and self.mirrored[trial.trial_id][1].state.is_finished():
            return
        final = study_trial(self.space, trial.config, self.seen(trial), self.task, failed=failed,
                            ray_trial_id=trial.trial_id, path=trial_path(trial))
        if trial.trial_id not in self.mirrored:
            self.mirrored[trial.trial_id] = (self.storage.create_new_trial(self.study_id, template_trial=final),
                                             final)
            return
        trial_id, current = self.mirrored[trial.trial_id]
        settle(self.storage, trial_id, current, final)
        self.mirrored[trial.trial_id] = (trial_id, final)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.guarded(trials, lambda: self.start(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        super().on_trial_result(iteration, trials, trial, result, **info)
        self.guarded(trials, lambda: self.start(trial))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.guarded(trials, lambda: self.finish(trial, failed=False))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.guarded(trials, lambda: self.finish(trial, failed=True))

    def on_experiment_end(self, trials, **info):
        if self.storage is not None:
            self.storage.engine.dispose()
            self.storage = None


class LiveTables(TrialWatcher):
    """Rewrite trials.csv and best.json (`"running": true`) each time a trial finishes.

    Rows follow Ray's trial order; a trial not finished yet has status RUNNING or PENDING.
    """

    def __init__(self, experiment: Path, about: dict, concurrency: int, task: Task):
        super().__init__()
        self.experiment, self.about, self.concurrency, self.task = Path(experiment), about, concurrency, task
        self.started = time.time()

    def setup(self, **info):
        super().setup(**info)
        self.started = time.time()

    def table(self, trials, just_finished=None, finished_state: str = "TERMINATED") -> pd.DataFrame:
        rows = []
        for trial in trials:
            if not trial.config:
                continue
            state = (finished_state if trial is just_finished
                     else trial.status if trial.status in ("TERMINATED", "ERROR", "RUNNING") else "PENDING")
            rows.append(trial_row(trial.trial_id, trial.config, self.seen(trial), state, trial_path(trial),
                                  self.task))
        return pd.DataFrame(rows)

    def write(self, trials, trial, state: str) -> None:
        try:
            run = {"wall_seconds": round(time.time() - self.started, 1), "concurrency": self.concurrency}
            write_tables(self.experiment, self.table(trials, trial, state), self.about, run, self.task,
                         running=True, complete=False)
        except Exception as err:  # the tables are written again at the next trial's end, and at the end
            print(f"galaxy_tune: could not update {self.experiment}/{layout.TRIALS} ({type(err).__name__}: "
                  f"{err})", file=sys.stderr)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.write(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.write(trials, trial, "ERROR")


def watchers(experiment: Path, name: str, space: SearchSpace, about: dict, concurrency: int,
             task: Task) -> list[tune.Callback]:
    """The callbacks that keep optuna.db, trials.csv and best.json current while a search runs."""
    return [StudyMirror(experiment / layout.STUDY, name, space, task),
            LiveTables(experiment, about, concurrency, task)]
