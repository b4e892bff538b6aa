"""A search's MLflow runs, kept up to date from the driver by `MlflowTrials`, a Ray Tune callback like the Optuna
mirror (`monitor`): trials on other nodes need no access to the tracking server.

The parent run (tag `galaxy_tune.search_id`, made when the search started and kept by `--resume`) records what
the search was asked to do and its best value as it improves. Each trial has a nested run with its config as
params, train_loss, val_loss and the val metric of each epoch (step = epoch), and its state as a tag. A resumed
driver finds the runs by their tags and adds only what they lack; a trial that the killed driver had started but
Ray lost (it ran others instead) has its run tagged `lost` and deleted, so the experiment holds one run per trial
Ray ran. When the search ends, `finish_search` makes the runs equal to trials.csv and adds the report.

The callbacks only note what changed; a thread of the driver writes it. A server that is down or slow never stops
or slows the search: its first failure is said once, what is not written yet waits (one entry per trial, so the
backlog is bounded by the trials), and writing is retried after a pause that doubles up to PAUSE_MAX_S. When the
search ends, the thread has FLUSH_S seconds to catch up, and what it could not write is said. The thread then stops
after the request it is making, so that `finish_search` never writes beside it.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from ray import tune

from .. import layout
from ..data.tasks import Task, get_task
from ..tracking import PARENT, ROLE, SEARCH_ID, STATE, TRIAL, Tracking, describe
from .monitor import KEPT, TrialWatcher, by_epoch, ended_status
from .space import default_space_path

PAUSE_MAX_S = 30.0
FLUSH_S = 30.0
STATUS = {"running": "RUNNING", "completed": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
FINAL = {"COMPLETED": "completed", "STOPPED": "stopped", "ERROR": "failed"}  # trials.csv status -> state tag


@dataclass
class Child:
    """A trial's run as this driver last wrote or found it."""

    run_id: str
    state: str
    logged: set[int] | None = None  # epochs logged; None: not read yet (a run found by its tag)


def final_state(config: dict, reports: list[dict], metric: str, failed: bool) -> str:
    """completed (every epoch), stopped (early, by the scheduler) or failed."""
    epochs = max((int(r["epoch"]) for r in by_epoch(reports, metric)), default=0)
    return FINAL["ERROR" if failed else ended_status(config, epochs)]


def search_params(searched: dict, about: dict, task: Task) -> dict:
    """The parent run's params: what search.json says the search was asked, and its backbone and data."""
    data = {f"data.{k}": v for k, v in about["data"].items() if isinstance(v, (str, int, float, bool))}
    return {"method": searched["method"], "space": searched.get("space") or default_space_path(searched["method"]),
            **{k: searched.get(k) for k in ("sampler", "scheduler", "num_samples", "max_epochs", "concurrency")},
            "model": about["model"], "weights": about["weights"], "task": task.name, **data,
            "galaxy_tune": about["versions"].get("galaxy_tune")}


class SearchRuns:
    """A search's parent run and its trials' nested runs in MLflow, found by their tags or made."""

    def __init__(self, uri: str, name: str, search_id: str, params: dict, task: Task):
        self.tracking, self.task = Tracking(uri, name), task
        self.parent = self.tracking.parent(name, {ROLE: "search", SEARCH_ID: search_id}, params)
        self.children = {run.data.tags[TRIAL]: Child(run.info.run_id, run.data.tags.get(STATE, "running"))
                         for run in self.tracking.find({ROLE: "trial", PARENT: self.parent})}

    def write_trial(self, trial_id: str, config: dict, reports: list[dict], state: str) -> None:
        """Make the trial's run hold every epoch of `reports` once, and `state`."""
        client, metric = self.tracking.client, self.task.val_metric
        child = self.children.get(trial_id)
        if child is None:
            run_id = self.tracking.child(self.parent, "trial", f"trial_{trial_id}", {TRIAL: trial_id}, config)
            child = self.children[trial_id] = Child(run_id, "running", set())
        if child.logged is None:
            child.logged = {m.step for m in client.get_metric_history(child.run_id, metric)}
        new = [r for r in by_epoch(reports, metric) if int(r["epoch"]) not in child.logged]
        self.tracking.log_steps(child.run_id, [(key, r[key], int(r["epoch"])) for r in new
                                               for key in ("train_loss", "val_loss", metric) if r.get(key) is not None])
        child.logged |= {int(r["epoch"]) for r in new}
        if state != child.state:
            client.set_tag(child.run_id, STATE, state)
            if state == "running":
                client.update_run(child.run_id, status="RUNNING")
            else:
                client.set_terminated(child.run_id, STATUS[state])
            child.state = state

    def drop_lost(self, kept: set[str]) -> None:
        """Delete the runs of trials other than `kept`: a killed driver made them after Ray's last snapshot of its
        trials, and Ray, which does not know them, ran others instead. Tagged `lost` first."""
        for trial_id in [t for t in self.children if t not in kept]:
            child = self.children.pop(trial_id)
            self.tracking.client.set_tag(child.run_id, STATE, "lost")
            self.tracking.client.delete_run(child.run_id)


def finish_search(experiment: Path) -> None:
    """The end of a search with --mlflow: its runs made equal to trials.csv (each trial's epochs from its
    result.json, its state; runs of trials Ray did not run deleted), then the report and figures as artifacts of
    the parent, its final best value, and the parent FINISHED. A server that does not answer is said in one line."""
    searched = json.loads((experiment / layout.SEARCH_OPTIONS).read_text())
    if not searched.get("mlflow"):
        return
    uri, task = searched["mlflow"], get_task(searched["data"]["task"])
    try:
        best = json.loads((experiment / layout.BEST).read_text())
        runs = SearchRuns(uri, experiment.name, searched["mlflow_search_id"], search_params(searched, best, task),
                          task)
        trials = pd.read_csv(experiment / layout.TRIALS, dtype={"trial_id": str})
        for row in trials.itertuples():
            reports = layout.trial_reports(Path(row.path)) if isinstance(row.path, str) else []
            runs.write_trial(row.trial_id, json.loads(row.config), reports, FINAL[row.status])
        runs.drop_lost(set(trials["trial_id"]))
        client, parent = runs.tracking.client, runs.parent
        key, step = f"best_{best['metric']}", int(best["finished_trials"])
        logged = {(m.step, m.value) for m in client.get_metric_history(parent, key)}
        if (step, best[best["metric"]]) not in logged:  # a search resumed to catch MLflow up has it already
            runs.tracking.log_metrics(parent, {key: best[best["metric"]]}, step=step)
        for path in [experiment / layout.REPORT, *sorted(experiment.glob("*.png"))]:
            if path.is_file():
                client.log_artifact(parent, str(path))
        client.set_tag(parent, "galaxy_tune.best_trial", best["trial_id"])
        client.set_terminated(parent, "FINISHED")
        print(f"MLflow: the search's runs are at {runs.tracking.url()}")
    except Exception as err:
        print(f"galaxy_tune: MLflow at {uri} did not take the end of the search ({describe(err)}); the search's own "
              f"files in {experiment} are complete, and `search {searched['method']} --resume --name "
              f"{experiment.name} --results-dir {experiment.parent}` brings its runs up to date once it answers",
              file=sys.stderr)


class MlflowTrials(TrialWatcher):
    """Keep the search's MLflow runs up to date (see the module's docstring)."""

    kept = (*KEPT, "train_loss", "val_loss")

    def __init__(self, uri: str, name: str, search_id: str, params: dict, task: Task):
        super().__init__()
        self.uri, self.name, self.search_id, self.params, self.task = uri, name, search_id, params, task

    def __getstate__(self):  # Ray pickles the callbacks with the Tuner: a resumed driver starts its own thread
        return {k: self.__dict__[k] for k in ("uri", "name", "search_id", "params", "task")} | {"reports": {}}

    def setup(self, **info):
        super().setup(**info)
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.notes: dict[str, dict] = {}  # Ray trial id -> config, reports, state, version
        self.dirty: set[str] = set()
        self.ray_ids: set[str] | None = None  # Ray's trials when this driver began
        self.closing = self.failing = self.said = self.abandoned = False
        self.runs, self.best, self.lost_checked = None, None, False
        self.thread = threading.Thread(target=self.work, name="galaxy_tune-mlflow", daemon=True)
        self.thread.start()

    # The callbacks: note what changed, in the driver's loop.
    def note(self, trial, state: str = "running") -> None:
        if not trial.config:
            return
        reports = list(self.seen(trial))
        with self.lock:
            entry = self.notes.setdefault(trial.trial_id, {"config": dict(trial.config), "version": 0})
            entry.update(reports=reports, state=state, version=entry["version"] + 1)
            self.dirty.add(trial.trial_id)
        self.wake.set()

    def begin(self, trials) -> None:
        """Once per driver: every trial Ray knows (a resumed driver's first look), and which those are."""
        if self.ray_ids is not None:
            return
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                self.note(trial, final_state(trial.config, self.seen(trial), self.task.val_metric,
                                             trial.status == "ERROR"))
            elif self.seen(trial):
                self.note(trial)
        with self.lock:
            self.ray_ids = {t.trial_id for t in trials}
        self.wake.set()

    def on_step_begin(self, iteration, trials, **info):
        self.begin(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.note(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        super().on_trial_result(iteration, trials, trial, result, **info)
        self.note(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.note(trial, final_state(trial.config, self.seen(trial), self.task.val_metric, False))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.note(trial, "failed")

    def on_experiment_end(self, trials, **info):
        self.begin(trials)
        self.closing = True
        self.wake.set()
        self.thread.join(FLUSH_S)
        late = self.thread.is_alive()
        if late:  # it stops after its request in flight, which MLflow's own timeout bounds (REQUEST_DEFAULTS)
            self.abandoned = True
            self.wake.set()
            self.thread.join()
        with self.lock:
            behind = len(self.dirty)
        if behind or late:
            print(f"galaxy_tune: MLflow at {self.uri} did not take the last updates of {behind} trial(s); the "
                  "search's own files are complete", file=sys.stderr)

    # The thread: write what was noted.
    def work(self) -> None:
        pause = 1.0
        while True:
            self.wake.wait(timeout=pause if self.failing else None)
            self.wake.clear()
            if self.abandoned:
                return
            try:
                self.write()
            except Exception as err:
                if not self.said:
                    print(f"galaxy_tune: MLflow at {self.uri} does not answer ({describe(err)}); the search goes on "
                          "and its runs are written when it answers", file=sys.stderr)
                self.failing = self.said = True
                pause = min(2 * pause, PAUSE_MAX_S)
                if self.closing:
                    return
                continue
            if self.failing:
                print(f"galaxy_tune: MLflow at {self.uri} answers again: its runs are up to date", file=sys.stderr)
            self.failing, pause = False, 1.0
            with self.lock:
                done = self.closing and not self.dirty
            if done or self.abandoned:
                return

    def write(self) -> None:
        if self.runs is None:
            self.runs = SearchRuns(self.uri, self.name, self.search_id, self.params, self.task)
            history = self.runs.tracking.client.get_metric_history(self.runs.parent, f"best_{self.task.val_metric}")
            values = [m.value for m in history]
            self.best = values[self.task.arg_best(values)] if values else None
            print(f"MLflow: this search's runs are at {self.runs.tracking.url()}")
        with self.lock:
            work = {trial_id: dict(self.notes[trial_id]) for trial_id in self.dirty}
            ray_ids, noted = self.ray_ids, set(self.notes)
        for trial_id, note in work.items():
            if self.abandoned:
                return
            self.runs.write_trial(trial_id, note["config"], note["reports"], note["state"])
            with self.lock:
                if self.notes[trial_id]["version"] == note["version"]:
                    self.dirty.discard(trial_id)
        if self.abandoned:
            return
        if ray_ids is not None and not self.lost_checked:
            self.runs.drop_lost(ray_ids | noted)
            self.lost_checked = True
        if not self.abandoned:
            self.write_best()

    def write_best(self) -> None:
        """The parent's best val metric so far, at step = the trials finished, each time it improves."""
        metric = self.task.val_metric
        with self.lock:
            finished = [n for n in self.notes.values() if n["state"] in ("completed", "stopped")]
        values = [float(r[metric]) for n in finished for r in by_epoch(n["reports"], metric)]
        if not values:
            return
        best = values[self.task.arg_best(values)]
        if self.best is None or (best != self.best and self.task.arg_best([self.best, best]) == 1):
            self.runs.tracking.log_metrics(self.runs.parent, {f"best_{metric}": best}, step=len(finished))
            self.best = best


def tracked(options, searched: dict | None, about: dict, task: Task) -> list[tune.Callback]:
    """The MLflow callback of a new search with --mlflow (none without), from what its search.json holds: its
    parent run is tagged with the id kept there, and records what the search was asked to do."""
    if not options.mlflow:
        return []
    return [MlflowTrials(options.mlflow, options.name, searched["mlflow_search_id"],
                         search_params(searched, about, task), task)]
