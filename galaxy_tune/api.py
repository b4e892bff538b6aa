"""The Python API, one function per CLI command, for notebooks: `galaxy_tune.search(...)`, `retrain`, `predict`.

It owns the defaults a user relies on: with no `data_dir`, the built-in demo data (generated once under
`results/demo-data`) with demo-sized settings that finish in minutes on a 2-core CPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd


from . import search as _search
from .data import DataConfig, Prepared, data_summary, load_prepared, prepare as _prepare, prepared_folder
from .demo_data import DEMO, demo_data_dir
from .errors import GalaxyTuneError
from .kaggle import CSV_NAME
from .model import load_backbone
from .predict import predict_folder
from .report import write_retrain_report, write_search_report
from .retrain import ALL_METHODS, latest_searches, read_best, run_retrain

DEFAULT_SEEDS = 3
DEFAULT_IMAGE_SIZE_PX = 224


def data_config(data_dir: Path | None, results_dir: Path, image_size_px: int | None, crop_px: int | None,
                task: str = "seed-top2", seed: int = 0, min_vote: float = 0.8) -> DataConfig:
    """The user's data, or the demo data with demo-sized pixels when no folder is given."""
    if data_dir is not None:
        return DataConfig(Path(data_dir), task=task, min_vote=min_vote, seed=seed,
                          image_size_px=image_size_px or DEFAULT_IMAGE_SIZE_PX, crop_px=crop_px)
    folder = demo_data_dir(results_dir)
    size, crop = image_size_px or DEMO["image_size_px"], crop_px or DEMO["crop_px"]
    print(f"no data folder given: using the built-in demo data in {folder} ({size} px, demo-sized defaults)")
    return DataConfig(folder, task=task, min_vote=min_vote, seed=seed, image_size_px=size, crop_px=crop)


def prepare(data_dir: Path | None = None, out: Path | None = None, *, results_dir: Path = Path("results"),
            task: str = "seed-top2", min_vote: float = 0.8, image_size_px: int | None = None,
            crop_px: int | None = None, seed: int = 0, skip_bad: bool = False) -> Prepared:
    """Validate the data, write the split manifest and build the pixel cache."""
    config = data_config(data_dir, results_dir, image_size_px, crop_px, task, seed, min_vote)
    return _prepare(config, Path(out) if out else prepared_folder(results_dir, config), skip_bad=skip_bad)


def search(method: str, data_dir: Path | None = None, *, results_dir: Path = Path("results"),
           name: str | None = None, space: Path | None = None, num_samples: int | None = None,
           max_epochs: int | None = None, image_size_px: int | None = None, crop_px: int | None = None,
           task: str = "seed-top2", min_vote: float = 0.8, skip_bad: bool = False, model: str | None = None,
           cpus_per_trial: float = 1.0,
           gpus_per_trial: float = 0.0, max_concurrent: int | None = None, address: str | None = None,
           seed: int = 0, max_failures: int = 2, checkpoint_every_s: float = 60.0, resume: bool = False,
           augment: bool = True) -> Path:
    """Run (or, with resume and name, continue) a Ray Tune + Optuna search; returns the experiment folder."""
    if resume:
        if not name:
            raise GalaxyTuneError("--resume needs the --name of the search to continue")
        # Everything else comes from the experiment's search.json.
        options = _search.SearchOptions(method=method, data_dir=Path(), results_dir=Path(results_dir), name=name,
                                        resume=True)
    else:
        demo = data_dir is None
        config = data_config(data_dir, results_dir, image_size_px, crop_px, task, seed, min_vote)
        options = _search.SearchOptions(
            method=method, data_dir=config.data_dir, results_dir=Path(results_dir),
            name=name or f"search-{method}-{time.strftime('%Y%m%d-%H%M%S')}", space=space,
            num_samples=num_samples if num_samples is not None else (DEMO["num_samples"] if demo else 20),
            max_epochs=max_epochs if max_epochs is not None else (DEMO["max_epochs"] if demo else None),
            image_size_px=config.image_size_px, crop_px=config.crop_px, task=task, min_vote=min_vote,
            skip_bad=skip_bad, model=model, cpus_per_trial=cpus_per_trial,
            gpus_per_trial=gpus_per_trial, max_concurrent=max_concurrent, address=address, seed=seed,
            max_failures=max_failures, checkpoint_every_s=checkpoint_every_s, augment=augment)
    experiment = _search.run_search(options)
    print(f"search results in {experiment}; report: {write_search_report(experiment)}")
    return experiment


def retrain(results_dir: Path = Path("results"), from_experiments: list[Path] | None = None,
            methods: list[str] | None = None, seeds: int | None = None, max_epochs: int | None = None,
            data_dir: Path | None = None, image_size_px: int | None = None, crop_px: int | None = None,
            task: str = "seed-top2", min_vote: float = 0.8, skip_bad: bool = False, seed: int = 0,
            model: str | None = None, gpus: float = 0.0, augment: bool = True) -> Path:
    """Retrain the best config of each method, test direct / full / LoRA; returns the retrain folder."""
    if from_experiments:
        experiments = {read_best(Path(f))["method"]: Path(f) for f in from_experiments}
    else:
        experiments = latest_searches(results_dir)
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
        prepared = load_prepared(Path(data["prepared"]), data["image_size_px"], data["crop_px"])
        model_name = model or best["model"]
        for method, folder in used.items():
            print(f"{method}: best config of {folder}")
    else:
        config = data_config(data_dir, results_dir, image_size_px, crop_px, task, seed, min_vote)
        prepared = _prepare(config, prepared_folder(results_dir, config), skip_bad=skip_bad)
        _, model_name = load_backbone(model, num_labels=len(prepared.class_names))
    on_demo_data = Path(data_summary(prepared)["data_dir"]) == (Path(results_dir) / "demo-data").resolve()
    if on_demo_data:  # demo-sized: the reference recipes' 7-10 epochs are capped at the demo search's budget
        max_epochs = DEMO["max_epochs"] if max_epochs is None else max_epochs
    if seeds is None:
        seeds = DEMO["seeds"] if on_demo_data else DEFAULT_SEEDS
    out = Path(results_dir) / f"retrain-{time.strftime('%Y%m%d-%H%M%S')}"
    run_retrain(prepared, model_name, used, out, methods=methods, seeds=seeds, max_epochs=max_epochs, gpus=gpus,
                augment=augment)
    report = write_retrain_report(out)
    print()
    print(report.read_text())
    print(f"retrain results in {out}")
    return out


def predict(model_dir: Path, images_dir: Path, out_csv: Path = Path("predictions.csv"), *, tta: bool = False,
            image_size_px: int | None = None, crop_px: int | None = None) -> pd.DataFrame:
    """Classify a folder of galaxy JPEGs with a retrained model; writes and returns GalaxyID + class probabilities."""
    return predict_folder(Path(model_dir), Path(images_dir), Path(out_csv), tta=tta, image_size_px=image_size_px,
                          crop_px=crop_px)
