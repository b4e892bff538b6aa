"""The search: Ray Tune runs trials of `trainable.train_trial`, Optuna's TPE proposes configs, ASHA stops weak ones.

`--sampler` and `--scheduler` choose other proposers and stopping rules (`strategy.SAMPLERS`, `SCHEDULERS`); what
each achieves is measured by `bench search`. Every part optimises the task's val metric in its direction
(`tasks.Task`: val_accuracy, higher is better, or kaggle-votes' val_rmse, lower is better): the sampler, the
scheduler, the checkpoints kept, the tables and the study.

An experiment folder `results/<name>/` holds Ray Tune's own results (open it with `tune.ExperimentAnalysis` or
`Tuner.restore`), `optuna.db` (the study, for `optuna-dashboard` / `optuna.load_study`), `trials.csv`,
`best.json` and `search.json` (what the search was asked to do). The study, trials.csv and best.json grow while
trials finish (`monitor`), and are made final when the search ends. With `--storage`, Ray's results are in the
object storage instead (`galaxy_tune.storage`), galaxy_tune's files are uploaded beside them (`uploads`), and the
experiment folder is the driver's working copy: its files, and each trial's reports without its checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from .. import layout
from .cluster import check_resources, start_ray
from ..data.prepare import Prepared, data_summary, load_prepared, prepare, prepared_folder
from ..errors import GalaxyTuneError, Stopped
from ..models.choices import RANDOM_BACKBONES, describe_weights, is_timm
from .faults import (STOP_MARKER, GracefulStop, KeepReportsOnRetry, PruneCheckpoints, SayRetries, StopMark,
                     check_ray_state, prune_checkpoints, retried)
from .options import SearchOptions, saved_options
from .monitor import finish_study, study_trial, trial_row, watchers, write_tables
from ..provenance import library_versions
from ..signals import STOP_SIGNALS, handlers_kept
from ..storage import SHARED, Storage, object_storage
from ..tracking import check_experiment
from .space import SearchSpace, default_space_path, load_space
from .strategy import make_sampler, make_scheduler, uses_constant_liar
from .tracking import tracked
from ..data.tasks import Task, get_task
from .trainable import train_trial
from .uploads import TABLES, UploadViews
from ..train_config import METHODS, TrainConfig

TABLE_PARAMETERS = 5  # searched parameters shown in the console table


def run_search(options: SearchOptions) -> Path:
    """Run (or resume) a search; returns the experiment folder with trials.csv, best.json and optuna.db."""
    if options.method not in METHODS:
        raise GalaxyTuneError(f"unknown method {options.method!r}: choose one of {', '.join(METHODS)}")
    experiment = Path(options.results_dir).resolve() / options.name
    if options.resume:
        saved = saved_options(experiment)
        if options.method != saved.method:
            raise GalaxyTuneError(f"{experiment} is a {saved.method} search: resume it with "
                                  f"`search {saved.method} --resume --name {saved.name}`")
        if options.mlflow is not None and options.mlflow != saved.mlflow:
            raise GalaxyTuneError(f"{experiment} logs to MLflow at {saved.mlflow or 'no server (no --mlflow)'}, not "
                                  f"{options.mlflow}: a resumed search keeps the runs where they began, so resume it "
                                  "without --mlflow")
        if options.storage is not None and options.storage != saved.storage:
            kept = saved.storage or "its own folder (no --storage)"
            raise GalaxyTuneError(f"{experiment} keeps its results in {kept}, not {options.storage}: resume it "
                                  "without --storage")
        # The cluster's head may have moved since (a requeued job): the --address given now wins.
        return search_in(experiment, dataclasses.replace(saved, address=options.address or saved.address))
    with claim_experiment(experiment):
        return search_in(experiment, options)


@contextmanager
def claim_experiment(experiment: Path) -> Iterator[None]:
    """Make the new experiment folder first, atomically: of two searches started with one --name, one gets it and
    the other is refused at once. A search refused before its first trial leaves no folder behind."""
    with ExitStack() as claimed:
        try:
            claimed.enter_context(layout.new_folder(experiment, exist_ok=False))
        except FileExistsError:
            raise GalaxyTuneError(f"experiment {experiment} already exists (a search may be running there): choose "
                                  "another --name, or pass --resume to continue it once it has stopped") from None
        yield


def search_in(experiment: Path, options: SearchOptions) -> Path:
    """The search of `options` in its experiment folder, made already (or resumed)."""
    check_experiment(options.mlflow, options.name)
    storage = object_storage(options.storage) if options.storage else None
    results_dir = experiment.parent
    task = get_task(options.data.task)
    overrides = {"method": options.method, "seed": options.data.seed, "augment": options.augment,
                 **dict(task.fixed)}
    if options.max_epochs is not None:
        overrides["epochs"] = options.max_epochs
    # A resumed search searches the copy it made of its space: the file may have changed, or be on another machine.
    saved_space = experiment / layout.SPACE
    space_file = saved_space if options.resume and saved_space.is_file() else \
        options.space or default_space_path(options.method)
    space = load_space(space_file, overrides)

    # Resources first: a request no node can satisfy is refused before minutes go into caching pixels.
    start_ray(options.address)
    gpus_per_trial, max_concurrent = check_resources(options.cpus_per_trial, options.gpus_per_trial, options.device,
                                                     options.max_concurrent)
    options = dataclasses.replace(options, gpus_per_trial=gpus_per_trial)
    chosen = check_backbones(space, options.method, space_file, options.model)
    stored = json.loads((experiment / layout.SEARCH_OPTIONS).read_text()).get("shared") if options.resume else None
    if storage and stored:  # resumed, here or on another machine: the data it searched, from the storage
        shared = storage, stored
        prepared = load_prepared(storage.fetch_prepared(stored, ray.util.get_node_ip_address()),
                                 options.data.image_size_px, options.data.crop_px)
    else:
        prepared = prepare(options.data, prepared_folder(results_dir, options.data))
        shared = share_prepared(storage, prepared) if storage else None
    if chosen and options.model is None:  # each trial's config names its backbone, loaded above
        model_name = chosen[0]
    else:
        model_name = options.model if options.model in RANDOM_BACKBONES else pretrained_backbone(options, prepared)
    searched = None  # a resumed search keeps its search.json
    if not options.resume:
        # The resolved model is saved as the explicit one: a resumed search never falls back to other weights.
        searched = {**asdict(options), "model": model_name, "prepared": str(prepared.folder),
                    "shared": shared and shared[1], "concurrency": max_concurrent,
                    "constant_liar": uses_constant_liar(options, max_concurrent),
                    "mlflow_search_id": uuid.uuid4().hex if options.mlflow else None}  # its MLflow run's tag
        (experiment / layout.SEARCH_OPTIONS).write_text(json.dumps(searched, indent=2, default=str))
        saved_space.write_text(space.source)
    if storage:
        storage.upload_views(experiment, [layout.SEARCH_OPTIONS, layout.SPACE])

    started = time.time()
    about = about_search(options, model_name, prepared, experiment)  # what best.json says of the search
    with warnings.catch_warnings():
        # A resumed trial re-runs the epochs after its last checkpoint and reports them again; Optuna keeps the
        # first report of a step and warns about the second, which is expected here, not a problem to look into.
        warnings.filterwarnings("ignore", "The reported value is ignored because this `step=", UserWarning)
        with handlers_kept((signal.SIGINT, *STOP_SIGNALS)):  # Ray Tune's run leaves its own installed
            grid = make_tuner(options, space, prepared, model_name, max_concurrent, experiment, about, task,
                              storage, shared, searched).fit()
    if storage:  # the working copy of each trial's reports, which the tables, the report and MLflow read
        copy_trial_reports(storage, options, experiment)
    try:
        write_results(grid, options, space, experiment, about, task,
                      {"wall_seconds": round(time.time() - started, 1), "concurrency": max_concurrent})
    finally:
        if storage:
            storage.upload_views(experiment, [*TABLES, layout.STUDY])
    return experiment


def make_tuner(options: SearchOptions, space: SearchSpace, prepared: Prepared, model_name: str,
               max_concurrent: int, experiment: Path, about: dict, task: Task, storage: Storage | None,
               shared: tuple[Storage, str] | None, searched: dict | None = None) -> tune.Tuner:
    """A new Tuner (Optuna TPE proposing, ASHA stopping), or the interrupted one of `experiment` on --resume.
    `shared`: the prepared data in the object storage; `searched`: what a new search's search.json holds."""
    # Ray's experiment: in the experiment folder, or under the object storage's root.
    ray_path, filesystem = (storage.path(options.name), storage.filesystem) if storage else (str(experiment), None)
    marker = StopMark(storage.path(options.name, STOP_MARKER), storage.filesystem) if storage else \
        StopMark(str(experiment / STOP_MARKER))
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, prepared_dir=str(prepared.folder), image_size_px=prepared.image_size_px,
                             crop_px=prepared.crop_px, model_name=model_name, cpus=options.cpus_per_trial,
                             gpus=options.gpus_per_trial, checkpoint_every_s=options.checkpoint_every_s,
                             stop_marker=marker, shared=shared),
        {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial})
    liar = "" if options.sampler == "random" else \
        " (constant liar)" if uses_constant_liar(options, max_concurrent) else " (no constant liar)"
    print(f"{options.num_samples} trials, {max_concurrent} at once; sampler {options.sampler}{liar}, "
          f"scheduler {options.scheduler}")
    if options.resume and tune.Tuner.can_restore(ray_path, storage_filesystem=filesystem):
        print(f"resuming {experiment}: finished trials are kept, unfinished ones continue from their checkpoints")
        # The searcher's in-memory Optuna study is restored from Ray's saved searcher state (a live sqlite
        # study would be newer than that state and break the restore), so TPE keeps every finished trial.
        return restore(experiment, trainable, ray_path, filesystem)
    max_epochs = int(space.fixed.get("epochs", TrainConfig().epochs))
    metric, mode = task.val_metric, task.mode
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(space.suggest, metric=metric, mode=mode,
                                    points_to_evaluate=list(space.points_to_evaluate),
                                    sampler=make_sampler(options, max_concurrent)),
            scheduler=make_scheduler(options.scheduler, max_epochs, task),
            num_samples=options.num_samples, max_concurrent_trials=max_concurrent,
            reuse_actors=True,  # a new trial runs in a finished trial's worker: no new process, no re-imports
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=options.name, storage_path=ray_path.rpartition("/")[0], storage_filesystem=filesystem, verbose=1,
            progress_reporter=progress_table(space, task),
            checkpoint_config=tune.CheckpointConfig(checkpoint_score_attribute=metric, checkpoint_score_order=mode),
            callbacks=[GracefulStop(marker), PruneCheckpoints(experiment, task), SayRetries(options.max_failures),
                       KeepReportsOnRetry(),
                       # then optuna.db, trials.csv and best.json as trials run, and the MLflow runs
                       *watchers(experiment, options.name, space, about, max_concurrent, task),
                       *tracked(options, searched, about, task),
                       *([UploadViews(storage, experiment)] if storage else [])],
            failure_config=tune.FailureConfig(max_failures=options.max_failures)))


def write_results(grid: tune.ResultGrid, options: SearchOptions, space: SearchSpace, experiment: Path,
                  about: dict, task: Task, run: dict) -> None:
    """trials.csv and best.json, final (`"running": false`); for a search that ran to its end (`"complete": true`)
    the Optuna study too, made equal to what Ray ran; prints the ranking."""
    trials = trials_table(grid, experiment, task)
    if trials.empty:
        raise GalaxyTuneError(f"the search {experiment} ran no trial: check the Ray logs above")
    for folder in trials.loc[trials["status"].isin(["COMPLETED", "STOPPED"]), "path"]:
        # Not an unfinished trial's: a stop can leave it a newer checkpoint than the one Ray's state resumes from.
        prune_checkpoints(Path(folder), task, grid.filesystem, f"{grid.experiment_path}/{Path(folder).name}")
    # Every trial created and ended: a stop ends the running trials too, which Ray then counts as terminated.
    complete = len(trials) >= options.num_samples and not (trials["status"] == "UNFINISHED").any()
    best = write_tables(experiment, trials, about, {**run, "retried": retried(trials)}, task, running=False,
                        complete=complete)
    if not complete:
        finished = (trials["status"] != "UNFINISHED").sum()
        raise Stopped(f"the search stopped after {finished} finished trial(s), all kept in {experiment}: continue it "
                      f"with the same command and --resume auto, or `python -m galaxy_tune search {options.method} "
                      f"--resume --name {options.name} --results-dir {experiment.parent}`")
    save_study(experiment / layout.STUDY, options.name, space, grid, task)
    if best is None:
        first = next(str(r.error).strip().splitlines()[-1] for r in grid if r.error is not None)
        raise GalaxyTuneError(f"every trial of {experiment} failed, the first with: {first} "
                              f"(all errors: {experiment}/*/error.txt)")
    print_ranked(trials, options.method, experiment, task)


def copy_trial_reports(storage: Storage, options: SearchOptions, experiment: Path) -> None:
    try:
        storage.download_trials(options.name, experiment)
    except OSError as err:
        raise GalaxyTuneError(f"could not copy the trials' reports from {storage.path(options.name)} "
                              f"({str(err).splitlines()[0]}): the results are all there; `search {options.method} "
                              f"--resume --name {options.name} --results-dir {experiment.parent}` copies them "
                              "again") from None


def share_prepared(storage: Storage, prepared: Prepared) -> tuple[Storage, str]:
    """Upload the prepared data once (a second search on the same data uploads nothing); each node's trials then
    download it once (`trainable.load_prepared_on_this_node`)."""
    cache = f"cache/{prepared.cache_path.name}"
    meta = f"{cache.removesuffix('.npy')}.json"  # what the cache was made from
    name, uploaded = storage.share_folder(prepared.folder, ["splits.csv", "prepare.json", cache, meta],
                                          identity=["splits.csv", meta])
    print(f"prepared data {'uploaded to' if uploaded else 'already in'} {storage.path(SHARED, name)}")
    return storage, name


def pretrained_backbone(options: SearchOptions, prepared: Prepared) -> str:
    """The pretrained backbone's name, once it loads here (from the cache or the Hub) before any trial starts; the
    default falls back to random weights when its own can't be had. A random backbone needs no such check, and the
    driver then imports neither torch nor transformers."""
    from ..models.backbone import load_backbone

    _, model_name = load_backbone(options.model, num_labels=len(prepared.class_names), seed=options.data.seed)
    return model_name


def space_backbones(space: SearchSpace) -> list[str]:
    """The backbones a space chooses among: its `model` parameter's choices, or its fixed model, or none."""
    chosen = [p.distribution.choices for p in space.params if p.name == "model"]
    return list(chosen[0]) if chosen else [space.fixed["model"]] if space.fixed.get("model") else []


def check_backbones(space: SearchSpace, method: str, space_file: Path, model: str | None) -> list[str]:
    """The backbones the space chooses among, each loaded here (from the cache or the Hub) before any trial starts;
    otherwise each trial that drew a missing one fails. For LoRA, each must take every `lora_targets` the space can
    give it, and so must a timm --model (HF ResNets take every target)."""
    chosen = space_backbones(space)
    backbones = chosen or ([model] if method == "lora" and model and is_timm(model) else [])
    if not backbones:
        return chosen
    from ..models.backbone import build_model
    from ..models.lora import add_lora

    searched_targets = next((p for p in space.params if p.name == "lora_targets"), None)

    def targets_of(backbone: str) -> set[str]:  # what lora_targets a trial of this backbone can get
        fixed = {space.fixed.get("lora_targets", TrainConfig.lora_targets)}
        if searched_targets is None:
            return fixed
        takes = backbone in searched_targets.when.get("model", (backbone,))
        return (set(searched_targets.distribution.choices) if takes else set()) | (
            fixed if searched_targets.when else set())

    for backbone in backbones:
        where = f"search space {space_file}: model {backbone!r}" if chosen else f"--model {backbone}"
        try:
            model = build_model(backbone)
        except GalaxyTuneError as err:
            raise GalaxyTuneError(f"{where}: {err}") from None
        for target in sorted(targets_of(backbone)) if method == "lora" else []:
            try:
                add_lora(copy.deepcopy(model), rank=1, alpha=1, targets=target)
            except GalaxyTuneError as err:
                fix = ("give lora_targets a `when: {model: [...]}` condition, or drop one of the two" if chosen else
                       f"search a copy of {space_file} without it (--space)")
                raise GalaxyTuneError(f"{where} takes no lora_targets {target!r} ({err}): {fix}") from None
    return chosen


def about_search(options: SearchOptions, model_name: str, prepared: Prepared, experiment: Path) -> dict:
    """best.json's facts about the search as a whole (the best trial's own come from trials.csv)."""
    return {"method": options.method, "model": model_name, "weights": describe_weights(model_name, options.data.seed),
            "data": data_summary(prepared), "experiment": str(experiment), "versions": library_versions()}


def restore(experiment: Path, trainable, ray_path: str | None = None, filesystem=None) -> tune.Tuner:
    """Ray's `Tuner.restore` of an experiment (at `ray_path` in `filesystem`), or one line when galaxy_tune 0.1 saved
    it: Ray pickled that version's module paths (`galaxy_tune.space`, ...), which the data/, models/ and search/
    packages replaced."""
    check_ray_state(experiment, ray_path, filesystem)
    try:
        return tune.Tuner.restore(ray_path or str(experiment), trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("galaxy_tune."):
            raise
        raise GalaxyTuneError(f"{experiment} was saved by galaxy_tune 0.1 (it names the module {err.name}): resume "
                              "it with galaxy_tune 0.1.0, or start a new search; its trials.csv, best.json and "
                              "optuna.db still serve `retrain --from` and `report`") from None


def progress_table(space: SearchSpace, task: Task) -> tune.CLIReporter:
    """Ray Tune's progress table, reduced to the columns that tell trials apart: the first searched parameters of
    the space. Those searched under a condition are left out: Ray fails on a column the best trial lacks. The
    table is asked for: by default Ray prints it in a process's first search only (its verbosity is global)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new output engine ignores custom reporters
    params = [p.name for p in space.params if not p.when][:TABLE_PARAMETERS] or ["method"]
    return tune.CLIReporter(metric_columns={"epoch": "epoch", task.val_metric: task.metric_label},
                            parameter_columns=params, max_report_frequency=30, metric=task.val_metric, mode=task.mode,
                            sort_by_metric=True, print_intermediate_tables=True)


def trials_table(grid: tune.ResultGrid, experiment: Path, task: Task) -> pd.DataFrame:
    """One row per trial: id, status, epochs run, best and last val metric, per-epoch curve and config.

    Status: COMPLETED (every epoch), STOPPED (early, by ASHA), ERROR, or UNFINISHED (the search was interrupted).
    """
    analysis = tune.ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    ray_status = {t.trial_id: t.status for t in analysis.trials}
    rows = []
    for result in grid:
        if not result.config:  # created but never started before an interruption
            continue
        trial_id = Path(result.path).name.removeprefix("trial_")
        state = "ERROR" if result.error is not None else \
            "TERMINATED" if ray_status.get(trial_id) == "TERMINATED" else "UNFINISHED"
        folder = experiment / Path(result.path).name  # Ray's own, or the working copy of its reports
        rows.append(trial_row(trial_id, result.config, reports(result), state, str(folder), task))
    return pd.DataFrame(rows)


def reports(result: tune.Result) -> list[dict]:
    """A trial's reports in the order they came (its result.json), as dicts."""
    history = result.metrics_dataframe
    return [] if history is None or history.empty else history.to_dict("records")


def save_study(path: Path, name: str, space: SearchSpace, grid: tune.ResultGrid, task: Task) -> str:
    """Make the Optuna study in sqlite equal to the finished search (ASHA-stopped trials as pruned).

    The searcher keeps its study in memory while Ray runs (an sqlite study breaks `Tuner.restore`); the study
    users open was mirrored from Ray's trials as they ran (monitor.StudyMirror) and is completed here from Ray's
    results, one trial per Ray trial, resumed or not. Returns "updated" (in place) or "rebuilt".
    """
    return finish_study(path, name, [
        study_trial(space, result.config, reports(result), task, failed=result.error is not None,
                    ray_trial_id=Path(result.path).name.removeprefix("trial_"), path=result.path)
        for result in grid], task.direction)


def print_ranked(trials: pd.DataFrame, method: str, experiment: Path, task: Task, top: int = 10) -> None:
    """A short ranked table of the best trials."""
    columns = ["trial_id", "status", "epochs", f"best_{task.val_metric}", "lr", "scheduler", "optimizer"]
    columns += ["lora_rank", "lora_alpha"] if method == "lora" else ["weight_decay"]
    table = task.rank(trials)[[c for c in columns if c in trials]].head(top)
    print(f"\n{method} search: {len(trials)} trials, ranked by best {task.metric_label} ({experiment})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    sys.stdout.flush()
