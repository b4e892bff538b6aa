"""The Python API, for notebooks: `prepare`, `search`, `retrain`, `report` and `predict`, one function per CLI
command of the same name, with the flags as keyword arguments (docs/reference/python-api.md maps the few whose
names differ, such as --image-size to `image_size_px`). `demo-data` has its own function,
`galaxy_tune.data.demo.write_demo_data`. `report` is not at the package's top level, where `galaxy_tune.report` is
the package of report writers (`galaxy_tune.report.write_report` reports one folder).

Settings left as None take the defaults of the dataclasses that hold them (`DataConfig`, `SearchOptions`,
`run_retrain`), so the CLI and the API share one set of defaults. With no `data_dir`, the built-in demo data
(generated once under `results/demo-data`) is used with demo-sized settings that finish in minutes on a 2-core CPU.

Each function imports what it needs when called, so a command pays only for its own libraries: `predict` and
`report` never load Ray, `prepare` not even torch.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import sys
import time
from pathlib import Path

import pandas as pd

from . import layout
from .data.prepare import DataConfig, Prepared, data_summary, load_prepared, prepare as _prepare, prepared_folder
from .data.demo import DEMO, DEMO_FOLDER, demo_data_dir
from .data.tasks import DEFAULT_TASK, TASKS, get_task
from .errors import GalaxyTuneError
from .tracking import check_experiment, log_retrain, resolve_uri


URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # s3://..., gs://..., file:/...: not a local path


def given(**settings) -> dict:
    """The settings the caller gave (None means "not given": the dataclass default applies)."""
    return {name: value for name, value in settings.items() if value is not None}


def data_config(data_dir: Path | None, results_dir: Path, **settings) -> DataConfig:
    """The user's data, or the demo data with demo-sized pixels when no folder is given."""
    settings = given(**settings)
    if data_dir is not None:
        config = DataConfig(Path(data_dir), **settings)
        refuse_unused_min_vote(config.task, settings.get("min_vote"))
        return config
    config = DataConfig(Path(DEMO_FOLDER), **{"image_size_px": DEMO["image_size_px"], "crop_px": DEMO["crop_px"],
                                              **settings})  # validated before any demo image is drawn
    refuse_unused_min_vote(config.task, settings.get("min_vote"))
    folder = demo_data_dir(results_dir)
    print(f"no data folder given: using the built-in demo data in {folder} ({config.image_size_px} px, "
          "demo-sized defaults)")
    return dataclasses.replace(config, data_dir=folder)


def refuse_unused_min_vote(task: str, min_vote: float | None) -> None:
    """--min-vote given for a task that keeps every galaxy it labels would be ignored: refuse it instead."""
    if min_vote is not None and not get_task(task).confident:
        confident = ", ".join(t.name for t in TASKS.values() if t.confident)
        raise GalaxyTuneError(f"--min-vote {min_vote:g} is ignored by --task {task}: only {confident} keeps "
                              "galaxies by their vote; drop --min-vote or choose that task")


def prepare(data_dir: Path | None = None, out: Path | None = None, *, results_dir: Path = layout.RESULTS_DIR,
            task: str | None = None, min_vote: float | None = None, image_size_px: int | None = None,
            crop_px: int | None = None, seed: int | None = None, skip_bad: bool = False,
            workers: int | None = None) -> Prepared:
    """Validate the data, write the split manifest and build the pixel cache."""
    config = data_config(data_dir, results_dir, task=task, min_vote=min_vote, image_size_px=image_size_px,
                         crop_px=crop_px, seed=seed, skip_bad=skip_bad, workers=workers)
    return _prepare(config, Path(out) if out else prepared_folder(results_dir, config))


def search(method: str, data_dir: Path | None = None, *, results_dir: Path = layout.RESULTS_DIR,
           name: str | None = None, space: Path | None = None, num_samples: int | None = None,
           max_epochs: int | None = None, image_size_px: int | None = None, crop_px: int | None = None,
           task: str | None = None, min_vote: float | None = None, skip_bad: bool = False, workers: int | None = None,
           model: str | None = None,
           cpus_per_trial: float | None = None, gpus_per_trial: float | None = None, device: str | None = None,
           max_concurrent: int | None = None, address: str | None = None, seed: int | None = None,
           max_failures: int | None = None, checkpoint_every_s: float | None = None, resume: bool | str = False,
           augment: bool = True, sampler: str | None = None, scheduler: str | None = None,
           mlflow: str | None = None, storage: str | None = None) -> Path:
    """Run (or, with resume and name, continue) a Ray Tune + Optuna search; returns the experiment folder.

    `resume="auto"` starts the search `name` when it does not exist yet, and continues it when it does, once the
    settings given here are found equal to the ones it started with. `mlflow`: a tracking URI, or "" for
    MLFLOW_TRACKING_URI (`galaxy_tune.tracking`). `storage`: a URI for Ray's results (`galaxy_tune.storage`).
    """
    if name is not None:
        layout.check_name(name)  # before anything is made or imported, the demo data included
    check_working_copy(results_dir, storage)
    mlflow = resolve_uri(mlflow)
    auto = resume == "auto"
    if resume and not name:
        raise GalaxyTuneError(f"--resume{' auto' if auto else ''} needs the --name of the search to continue")
    from .search.options import SearchOptions, check_unchanged, saved_options
    from .search.run import run_search

    experiment = Path(results_dir).resolve() / name if name else None
    if resume and storage is not None and not (experiment / layout.SEARCH_OPTIONS).is_file():
        from .storage import object_storage

        stored = object_storage(storage)  # a search started elsewhere: its working copy, made here
        if stored.exists(name, layout.SEARCH_OPTIONS):
            stored.pull(name, experiment.parent)
            print(f"copied the search {name} from {stored.path(name)} to {experiment}, without its checkpoints")
        elif not auto:
            raise GalaxyTuneError(f"no search to resume: {name} is neither in {stored.path()} nor at {experiment}: "
                                  "check --name, --storage and --results-dir")
    if auto and not (experiment / layout.SEARCH_OPTIONS).is_file() and experiment.exists():
        raise GalaxyTuneError(f"--resume auto: {experiment} holds no {layout.SEARCH_OPTIONS}: a search is starting "
                              "there, or one was stopped before it began; remove the folder once no search runs there")
    if resume and not auto:
        # Everything else comes from the experiment's search.json; --address may name the cluster's new head.
        options = SearchOptions(method, DataConfig(Path()), results_dir=Path(results_dir), name=name, resume=True,
                                address=address, mlflow=mlflow, storage=storage)
    else:
        demo = {"num_samples": DEMO["num_samples"], "max_epochs": DEMO["max_epochs"]} if data_dir is None else {}
        config = data_config(data_dir, results_dir, task=task, min_vote=min_vote, image_size_px=image_size_px,
                             crop_px=crop_px, seed=seed, skip_bad=skip_bad, workers=workers)
        options = SearchOptions(method, config, results_dir=Path(results_dir), augment=augment, **{**demo, **given(
            name=name, space=space, num_samples=num_samples, max_epochs=max_epochs, model=model,
            cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, device=device, max_concurrent=max_concurrent,
            address=address, max_failures=max_failures, checkpoint_every_s=checkpoint_every_s, sampler=sampler,
            scheduler=scheduler, mlflow=mlflow, storage=storage)})
        if auto and experiment.exists():
            check_unchanged(options, saved_options(experiment), experiment)
            print(f"--resume auto: {experiment} exists, with these settings: continuing it")
            options = dataclasses.replace(options, resume=True)
    experiment = run_search(options)
    from .report import write_search_report  # here: a search that stops or fails has no report to write

    print(f"search results in {experiment}; report: {write_search_report(experiment)}")
    stored = json.loads((experiment / layout.SEARCH_OPTIONS).read_text()).get("storage")
    if stored:
        from .storage import object_storage

        figures = sorted(path.name for path in experiment.glob("*.png"))
        try:
            object_storage(stored).upload_views(experiment, [layout.REPORT, *figures])
        except GalaxyTuneError as err:  # the search is done: its report stays here
            print(f"galaxy_tune: the report was not uploaded: {err}", file=sys.stderr)
    from .search.tracking import finish_search

    finish_search(experiment)
    return experiment


def check_working_copy(results_dir: Path, storage: str | None) -> None:
    """With --storage, --results-dir is this machine's working copy: refuse one that is not a local folder."""
    if storage is not None and URI.match(str(results_dir)):
        raise GalaxyTuneError(f"--results-dir {results_dir} is not a local folder: with --storage {storage}, it is "
                              "this machine's working copy; give a local folder")


def retrain(results_dir: Path = layout.RESULTS_DIR, *, from_experiments: list[Path] | None = None,
            methods: list[str] | None = None, seeds: int | None = None, max_epochs: int | None = None,
            data_dir: Path | None = None, image_size_px: int | None = None, crop_px: int | None = None,
            task: str | None = None, min_vote: float | None = None, skip_bad: bool = False, workers: int | None = None,
            seed: int | None = None,
            model: str | None = None, device: str | None = None, augment: bool = True,
            top_k: int | None = None, name: str | None = None, resume: bool | str = False,
            mlflow: str | None = None, storage: str | None = None) -> Path:
    """Retrain the `top_k` best configs of each method's search with `seeds` seeds, test direct / full / LoRA;
    returns the retrain folder, `results_dir/name` (default: retrain-<time>).

    `resume` continues the stopped retrain `name`, skipping its finished runs; `resume="auto"` starts it when it
    does not exist yet. Either way the settings given here must make the plan it started with. `mlflow`: a
    tracking URI, or "" for MLFLOW_TRACKING_URI, that gets the finished retrain's runs (`galaxy_tune.tracking`).
    `storage`: the URI of searches run with --storage; their files are copied into `results_dir` first, their
    prepared data into this node's cache, and the finished retrain, models included, goes to the storage too.
    """
    if name is not None:
        layout.check_name(name)
    check_working_copy(results_dir, storage)
    mlflow = resolve_uri(mlflow)
    if resume and not name:
        raise GalaxyTuneError(f"--resume{' auto' if resume == 'auto' else ''} needs the --name of the retrain to "
                              "continue")
    out = Path(results_dir) / (name or f"retrain-{time.strftime('%Y%m%d-%H%M%S')}")
    check_experiment(mlflow, out.name)
    from .models.backbone import load_backbone
    from .report import write_retrain_report
    from .retrain import ALL_METHODS, latest_searches, read_best, run_retrain
    from .train import pick_device

    for flag, value in (("--seeds", seeds), ("--max-epochs", max_epochs), ("--top-k", top_k)):
        if value is not None and value < 1:
            raise GalaxyTuneError(f"{flag} {value} must be 1 or more")
    device = pick_device(device).type  # an impossible device is refused before any data is prepared
    stored, copied = None, None
    if storage is not None:
        from .storage import object_storage

        stored = object_storage(storage)
        copied = stored.folders(layout.BEST)
        for search in copied:  # what retrain reads of a search
            stored.pull(search, Path(results_dir), only=(layout.SEARCH_OPTIONS, layout.BEST, layout.TRIALS))
            print(f"{search}: copied from {stored.path(search)}")
    if from_experiments:
        experiments = {read_best(Path(f))["method"]: Path(f) for f in from_experiments}
    else:
        experiments = latest_searches(results_dir, copied)  # with --storage, among its searches only
    methods = list(methods or ALL_METHODS)
    used = {m: experiments[m] for m in methods if m in experiments}
    # Every method is tested on the searches' data with their backbone (`direct` too), which must agree.
    searched = used or ({} if data_dir is not None else experiments)
    if searched:
        bests = {m: read_best(folder) for m, folder in searched.items()}
        setups = {(b["data"]["prepared"], b["data"]["image_size_px"], b["data"]["crop_px"], b["model"])
                  for b in bests.values()}
        if len(setups) > 1:
            raise GalaxyTuneError(f"the searches {', '.join(map(str, searched.values()))} used different data, image "
                                  "sizes or models: retrain them separately with --from and --methods")
        best = next(iter(bests.values()))
        data = best["data"]
        refuse_other_data(data, searched, data_dir=data_dir, task=task, min_vote=min_vote,
                          image_size_px=image_size_px, crop_px=crop_px, seed=seed)
        prepared = load_prepared(searched_data(stored, next(iter(searched.values())), data), data["image_size_px"],
                                 data["crop_px"])
        model_name = model or best["model"]
        for method, folder in used.items():
            print(f"{method}: best config of {folder}")
    else:
        config = data_config(data_dir, results_dir, task=task, min_vote=min_vote, image_size_px=image_size_px,
                             crop_px=crop_px, seed=seed, skip_bad=skip_bad, workers=workers)
        prepared = _prepare(config, prepared_folder(results_dir, config))
        _, model_name = load_backbone(model, num_labels=len(prepared.class_names))
    on_demo_data = Path(data_summary(prepared)["data_dir"]) == (Path(results_dir) / DEMO_FOLDER).resolve()
    # Demo-sized: 2 seeds, and the reference recipes' 7-10 epochs capped at the demo search's budget.
    demo = {"seeds": DEMO["seeds"], "max_epochs": DEMO["max_epochs"], "top_k": DEMO["top_k"]} if on_demo_data else {}
    run_retrain(prepared, model_name, used, out, methods=methods, augment=augment, device=device,
                resume=bool(resume) and (resume != "auto" or out.exists()),
                **{**demo, **given(seeds=seeds, max_epochs=max_epochs, top_k=top_k)})
    report = write_retrain_report(out)
    print()
    print(report.read_text())
    print(f"retrain results in {out}")
    if stored is not None:
        try:
            stored.upload_folder(out, out.name)
            print(f"retrain results, models included, uploaded to {stored.path(out.name)}")
        except OSError as err:  # the retrain is done: it stays here
            print(f"galaxy_tune: the retrain was not uploaded to {stored.path(out.name)} "
                  f"({str(err).splitlines()[0]}): it is all in {out}", file=sys.stderr)
    if mlflow:
        log_retrain(mlflow, out)
    return out


def searched_data(stored, experiment: Path, data: dict) -> Path:
    """The prepared data a search trained on: with --storage, what it shared there, fetched into this node's cache
    (the driver's folder may be on another machine)."""
    shared = json.loads((experiment / layout.SEARCH_OPTIONS).read_text()).get("shared") if stored else None
    if not shared:
        return Path(data["prepared"])
    return stored.fetch_prepared(shared, socket.gethostname())


DATA_FLAGS = {"data_dir": "--data-dir", "task": "--task", "min_vote": "--min-vote", "image_size_px": "--image-size",
              "crop_px": "--crop", "seed": "--seed"}


def refuse_other_data(data: dict, searched: dict[str, Path], **settings) -> None:
    """Retrain tests on its searches' data: a data setting given that differs from theirs is an error, not ignored."""
    if settings.get("data_dir") is not None:
        settings["data_dir"] = str(Path(settings["data_dir"]).resolve())
    searched_task = data.get("task", DEFAULT_TASK)  # best.json before tasks: the only task there was
    if settings.get("task") in (None, searched_task):
        refuse_unused_min_vote(searched_task, settings.get("min_vote"))
    for name, value in given(**settings).items():
        if value != data.get(name):
            raise GalaxyTuneError(
                f"{DATA_FLAGS[name]} {value} differs from the searches' {data.get(name)} "
                f"({', '.join(map(str, searched.values()))}): retrain tests on its searches' data; drop "
                f"{DATA_FLAGS[name]}, or search again with it")


def report(experiments: list[Path | str] | None = None, *, results_dir: Path = layout.RESULTS_DIR,
           out: Path | None = None, storage: str | None = None) -> list[Path]:
    """Rebuild the reports of search and retrain folders (default: all under `results_dir`); returns their
    report.md files. With `storage`, `experiments` names folders there (default: all of them): each is copied into
    `results_dir` without its weights, reported, and its report uploaded beside it."""
    from .report import write_report

    check_working_copy(results_dir, storage)
    marks = (layout.BEST, layout.RETRAIN)
    stored = None
    if storage is not None:
        from .storage import object_storage

        stored = object_storage(storage)
        found = stored.folders(*marks)
        missing = [str(e) for e in experiments or [] if str(e) not in found]
        if missing:
            raise GalaxyTuneError(f"{stored.path()} has no search or retrain {', '.join(missing)}: give names of "
                                  f"folders there ({', '.join(found) or 'it has none'})")
        folders = [stored.pull(str(e), Path(results_dir)) for e in experiments or found]
    else:
        folders = [Path(e) for e in experiments] if experiments else sorted(
            p.parent for p in Path(results_dir).glob("*/*.json") if p.name in marks)
    reports = []
    for folder in folders:
        reports.append(write_report(folder, Path(out) / folder.name if out else None))
        if stored is not None:
            written = reports[-1].parent
            stored.upload_views(written, [layout.REPORT, layout.EVALUATION, *sorted(
                p.name for p in written.glob("*.png"))])
    return reports


def predict(model_dir: Path | str, images_dir: Path, out_csv: Path | None = None, *, tta: bool = False,
            image_size_px: int | None = None, crop_px: int | None = None, device: str | None = None) -> pd.DataFrame:
    """GalaxyID and the model's outputs for a folder of galaxy JPEGs; also written to `out_csv` when given
    (the CLI's --out defaults to predictions.csv). `model_dir` may be in object storage (s3://.../hf, as
    `retrain --storage` uploads it): it is downloaded to a temporary folder first."""
    from .predict import predict_folder

    def predict_with(model: Path) -> pd.DataFrame:
        return predict_folder(model, Path(images_dir), None if out_csv is None else Path(out_csv), tta=tta,
                              image_size_px=image_size_px, crop_px=crop_px, device=device)

    if not URI.match(str(model_dir)):
        return predict_with(Path(model_dir))
    import tempfile

    from .storage import object_storage

    with tempfile.TemporaryDirectory(prefix="galaxy_tune-model-") as local:
        object_storage(str(model_dir)).download_all(Path(local))
        return predict_with(Path(local))
