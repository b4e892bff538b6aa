"""`bench search`: the same trial budget searched with ASHA + TPE and with random search at the full epoch budget.

The only benchmark that imports Ray and `galaxy_tune.search`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from .measure import bench_dir, environment, fmt, fmt_seconds, print_table, resolve_data_dir
from .. import layout
from ..cluster import start_ray
from ..data import DataConfig, load_prepared
from ..loader import open_split
from ..search import SearchOptions, run_search
from ..train import TrainConfig, make_model, pick_device


def bench_search(data_dir: Path | None = None, results_dir: Path = Path("results"), method: str = "full",
                 num_samples: int = 6, max_epochs: int = 4, model: str = "tiny", image_size_px: int = 32,
                 crop_px: int | None = 256, cpus_per_trial: float = 1.0, gpus_per_trial: float | None = None,
                 device: str = "auto", seed: int = 0) -> dict:
    """The same trial budget searched with ASHA + TPE and with random search run to the full epoch budget.

    Reports the trial-epochs each spent, the best val accuracy each reached, the epochs each needed to come
    within 1 point of random search's best, and the share of wall time spent outside training epochs.
    `device` and `gpus_per_trial` are `search`'s (e.g. 0.25 runs four trials on one GPU).
    """
    results_dir = Path(results_dir)
    data_dir = resolve_data_dir(data_dir, results_dir)
    searches_dir = bench_dir(results_dir) / f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    started_ray = not ray.is_initialized()
    started = time.perf_counter()
    start_ray(None)
    ray_start_seconds = time.perf_counter() - started if started_ray else None
    try:
        runs = {}
        for name, sampler, early_stopping in (("asha_tpe", "tpe", True), ("random", "random", False)):
            data = DataConfig(data_dir, image_size_px=image_size_px, crop_px=crop_px, seed=seed)
            options = SearchOptions(method, data, results_dir=searches_dir, name=name, num_samples=num_samples,
                                    max_epochs=max_epochs, model=model, cpus_per_trial=cpus_per_trial,
                                    gpus_per_trial=gpus_per_trial, device=device or "auto", sampler=sampler,
                                    early_stopping=early_stopping)
            experiment = run_search(options)
            concurrency = json.loads((experiment / layout.BEST).read_text())["concurrency"]
            runs[name] = search_figures(experiment, min(num_samples, concurrency))
            gpus_used = json.loads((experiment / layout.SEARCH_OPTIONS).read_text())["gpus_per_trial"]
    finally:
        if started_ray:
            ray.shutdown()

    best = json.loads((searches_dir / "asha_tpe" / layout.BEST).read_text())
    prepared = load_prepared(Path(best["data"]["prepared"]), image_size_px, crop_px)
    started = time.perf_counter()
    open_split(prepared, "train")
    open_split(prepared, "val")
    data_open_seconds = time.perf_counter() - started
    started = time.perf_counter()
    make_model(TrainConfig(method=method), best["model"], num_labels=len(prepared.class_names))
    model_build_seconds = time.perf_counter() - started

    target = runs["random"]["best_val_accuracy"] - 0.01
    for run in runs.values():
        run["epochs_to_target"] = epochs_to_reach(run.pop("events"), target)
    asha, rand = runs["asha_tpe"], runs["random"]
    to_target = asha["epochs_to_target"]
    figures = {
        "benchmark": "search",
        "settings": {"method": method, "model": model, "num_samples": num_samples, "max_epochs": max_epochs,
                     "image_size_px": image_size_px, "crop_px": crop_px, "cpus_per_trial": cpus_per_trial,
                     "gpus_per_trial": gpus_used, "device": device or "auto", "seed": seed, "data_dir": str(data_dir),
                     "experiments": str(searches_dir)},
        "asha_tpe": asha, "random": rand, "target_val_accuracy": target,
        "epochs_ratio": asha["trial_epochs"] / rand["trial_epochs"],
        "epochs_to_target_ratio": None if to_target is None else to_target / rand["trial_epochs"],
        "ray_start_seconds": ray_start_seconds, "model_build_seconds": model_build_seconds,
        "data_open_seconds": data_open_seconds,
        "environment": environment(pick_device("cpu" if gpus_used == 0 else "cuda")),
    }
    ray_start = "already running" if ray_start_seconds is None else f"{ray_start_seconds:.1f} s"
    print_table(f"bench search: {method}, {model}, {image_size_px} px, {num_samples} trials x {max_epochs} epochs "
                f"({searches_dir})", [
                    ("", "ASHA + TPE  |  random, full budget"),
                    ("trial-epochs used", f"{asha['trial_epochs']}  |  {rand['trial_epochs']}"),
                    ("best val accuracy", f"{asha['best_val_accuracy']:.3f}  |  {rand['best_val_accuracy']:.3f}"),
                    (f"epochs to reach {target:.3f} (random's best - 1 pt)",
                     f"{fmt(asha['epochs_to_target'])}  |  {fmt(rand['epochs_to_target'])}"),
                    ("wall seconds (tuner)", f"{asha['wall_seconds']:.1f}  |  {rand['wall_seconds']:.1f}"),
                    ("share of wall time outside training epochs",
                     f"{asha['overhead_share']:.0%}  |  {rand['overhead_share']:.0%}"),
                    ("in-trial overhead per trial (setup, checkpoints)",
                     f"{asha['in_trial_overhead_seconds']:.2f} s  |  {rand['in_trial_overhead_seconds']:.2f} s"),
                    ("tuner start to first trial running (+-1 s)",
                     " | ".join(fmt_seconds(r["first_trial_start_seconds"]) for r in (asha, rand))),
                    ("ASHA epochs to target / random's total epochs",
                     "not reached" if to_target is None else f"{to_target / rand['trial_epochs']:.2f}"),
                    ("ASHA total epochs / random's total epochs", f"{figures['epochs_ratio']:.2f}"),
                    ("Ray start", ray_start),
                    ("model build / data opening (per trial)",
                     f"{model_build_seconds:.2f} s / {data_open_seconds:.3f} s"),
                ])
    return figures


def search_figures(experiment: Path, concurrency: int) -> dict:
    """Epochs, best accuracy, overheads and concurrency of one finished search, plus its per-epoch events in time
    order. `processes` counts the worker processes (pids) that reported; `most_trials_at_once`, the trials that
    surely ran at the same time: Ray's timestamps are whole seconds (rounded down), so a trial counts from the
    latest its first report allows (timestamp + 1 s - time_total_s) to the earliest its last one does."""
    trials = pd.read_csv(experiment / layout.TRIALS)
    wall_seconds = json.loads((experiment / layout.BEST).read_text())["wall_seconds"]
    events, in_trial, trial_starts, spans, pids = [], [], [], [], set()
    for path, train_seconds in zip(trials["path"], trials["train_seconds"]):
        results = layout.trial_reports(Path(path))
        events += [(r["timestamp"], r["epoch"], r["val_accuracy"]) for r in results]
        if results:  # Ray's trial clock starts when the trial's code does: setup, epochs, checkpoints, reports
            in_trial.append(results[-1]["time_total_s"] - train_seconds)
            trial_starts.append(results[0]["timestamp"] - results[0]["time_total_s"])
            spans.append((results[0]["timestamp"] + 1 - results[0]["time_total_s"], results[-1]["timestamp"]))
            pids |= {r["pid"] for r in results if "pid" in r}
    # search.json is written just before the tuner starts; Ray's timestamps are whole seconds.
    tuner_start = (experiment / layout.SEARCH_OPTIONS).stat().st_mtime
    train_total = float(trials["train_seconds"].sum())
    return {
        "trials": len(trials), "trial_epochs": int(trials["epochs"].sum()),
        "best_val_accuracy": float(trials["best_val_accuracy"].max()), "wall_seconds": wall_seconds,
        "train_seconds": train_total, "concurrency": concurrency,
        "overhead_share": 1 - train_total / (wall_seconds * concurrency),
        "in_trial_overhead_seconds": float(np.mean(in_trial)) if in_trial else 0.0,
        "first_trial_start_seconds": min(trial_starts) - tuner_start if trial_starts else None,
        "processes": len(pids), "most_trials_at_once": most_at_once(spans),
        "errored_trials": int((trials["status"] == "ERROR").sum()) if "status" in trials else None,
        "experiment": str(experiment), "events": sorted(events, key=lambda e: (e[0], e[1])),
    }


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most (start, end) spans that overlap at one moment (one ending as another starts: no overlap; a span
    that ends before it starts: never running)."""
    spans = [(start, end) for start, end in spans if end > start]
    edges = sorted([(start, 1) for start, _ in spans] + [(end, 0) for _, end in spans])  # ends before starts
    running = most = 0
    for _, is_start in edges:
        running += 1 if is_start else -1
        most = max(most, running)
    return most


def epochs_to_reach(events: list[tuple], target: float) -> int | None:
    """Trial-epochs spent (in time order over all trials) until the best val accuracy so far reached `target`."""
    best = -1.0
    for spent, (_, _, accuracy) in enumerate(events, start=1):
        best = max(best, accuracy)
        if best >= target - 1e-9:
            return spent
    return None
