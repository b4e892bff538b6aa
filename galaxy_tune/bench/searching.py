"""`bench search`: search strategies (sampler + scheduler) run repeatedly on the same problem and budget, against
random search at the full epoch budget: best so far against trial-epochs and wall time, with 95 % bands.

The only benchmark that imports Ray and `galaxy_tune.search.run`; the statistics and the figure are in
`galaxy_tune.report.search_curves`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch

from .measure import bench_dir, environment, print_table, resolve_data_dir, write_json
from .. import layout
from ..search.cluster import start_ray
from ..data.prepare import DataConfig, load_prepared
from ..errors import GalaxyTuneError
from ..data.loader import open_split
from ..report.search_curves import (BENCH_FILE, best_so_far, epochs_to_reach, fmt_median_interval,
                                    plot_search_benchmark, summarize)
from ..search.options import SearchOptions
from ..search.run import run_search
from ..storage import object_storage, sub_uri
from ..search.strategy import SAMPLERS, SCHEDULERS
from ..train import TrainConfig, make_model

STRATEGIES = ("random+fifo", "tpe+fifo", "tpe-independent+asha", "tpe+asha", "tpe+hyperband")  # sampler+scheduler
BASELINE = "random+fifo"  # random search, every trial at the full epoch budget


def bench_search(data_dir: Path | None = None, results_dir: Path = Path("results"), method: str = "full",
                 num_samples: int = 12, max_epochs: int = 6, model: str = "tiny", image_size_px: int = 64,
                 crop_px: int | None = 256, cpus_per_trial: float = 1.0, gpus_per_trial: float | None = None,
                 device: str = "auto", seed: int = 0, repeats: int = 3,
                 strategies: tuple[str, ...] | list[str] = STRATEGIES, storage: str | None = None) -> dict:
    """Run each strategy `repeats` times (sampler seeds seed, seed + 1, ...; the same split, training seed and
    budget), the strategies taking turns within each repeat; returns and writes (search_bench.json and .png in
    the benchmark's folder) the summary: per strategy the mean best so far against trial-epochs and wall time with
    95 % bands, and the trial-epochs to reach random search's mean best - 1 point (median, bootstrap interval).
    `device`, `gpus_per_trial` and `storage` are `search`'s; with `storage`, each search goes to a folder of the
    benchmark's name there.
    """
    strategies = list(strategies)
    unknown = [s for s in strategies if s.partition("+")[0] not in SAMPLERS or s.partition("+")[2] not in SCHEDULERS]
    if unknown or BASELINE not in strategies or len(set(strategies)) < len(strategies):
        raise GalaxyTuneError(f"--strategies {' '.join(strategies)}: give distinct SAMPLER+SCHEDULER pairs "
                              f"(samplers {', '.join(SAMPLERS)}; schedulers {', '.join(SCHEDULERS)}) including "
                              f"{BASELINE}, the baseline")
    if repeats < 1:
        raise GalaxyTuneError(f"--repeats {repeats} must be 1 or more")
    results_dir = Path(results_dir)
    data_dir = resolve_data_dir(data_dir, results_dir)
    folder = bench_dir(results_dir) / f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    if storage is not None:
        object_storage(storage)  # checked before Ray starts
        storage = sub_uri(storage, folder.name)
    started_ray = not ray.is_initialized()
    started = time.perf_counter()
    start_ray(None)
    ray_start_seconds = time.perf_counter() - started if started_ray else None
    runs: dict[str, list[dict]] = {name: [] for name in strategies}
    try:
        for repeat in range(repeats):
            for name in strategies:  # in turns, so that load from other work spreads over every strategy
                sampler, _, scheduler = name.partition("+")
                options = SearchOptions(
                    method, DataConfig(data_dir, image_size_px=image_size_px, crop_px=crop_px, seed=seed),
                    results_dir=folder, name=f"{name}-r{repeat}", num_samples=num_samples, max_epochs=max_epochs,
                    model=model, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                    device=device or "auto", sampler=sampler, scheduler=scheduler, sampler_seed=seed + repeat,
                    storage=storage)
                runs[name].append(search_run(run_search(options), seed + repeat))
    finally:
        if started_ray:
            ray.shutdown()

    searched = json.loads((folder / f"{BASELINE}-r0" / layout.SEARCH_OPTIONS).read_text())
    prepared = load_prepared(Path(searched["prepared"]), image_size_px, crop_px)
    started = time.perf_counter()
    open_split(prepared, "train")
    open_split(prepared, "val")
    data_open_seconds = time.perf_counter() - started
    started = time.perf_counter()
    make_model(TrainConfig(method=method), searched["model"], num_labels=len(prepared.class_names))
    model_build_seconds = time.perf_counter() - started

    target = float(np.mean([r["best_val_accuracy"] for r in runs[BASELINE]])) - 0.01
    budget = float(np.mean([r["trial_epochs"] for r in runs[BASELINE]]))
    for name_runs in runs.values():
        for run in name_runs:
            run["epochs_to_target"] = epochs_to_reach(run["best_so_far"], target)
    figures = {
        "benchmark": "search",
        "settings": {"method": method, "model": model, "num_samples": num_samples, "max_epochs": max_epochs,
                     "image_size_px": image_size_px, "crop_px": crop_px, "cpus_per_trial": cpus_per_trial,
                     "gpus_per_trial": searched["gpus_per_trial"], "concurrency": searched["concurrency"],
                     "device": device or "auto", "seed": seed, "repeats": repeats, "strategies": strategies,
                     "data_dir": str(data_dir), "prepared": searched["prepared"], "experiments": str(folder),
                     "storage": storage},
        "baseline": BASELINE, "target_val_accuracy": target, "random_trial_epochs": budget,
        "strategies": {name: {"sampler": name.partition("+")[0], "scheduler": name.partition("+")[2],
                              "about": describe(name), "summary": summarize(runs[name], target, budget),
                              "runs": runs[name]} for name in strategies},
        "ray_start_seconds": ray_start_seconds, "model_build_seconds": model_build_seconds,
        "data_open_seconds": data_open_seconds,
        "environment": search_environment(folder),
        "figure": str(folder / BENCH_FILE.replace(".json", ".png")),
    }
    plot_search_benchmark(figures).savefig(figures["figure"], dpi=110)
    write_json(figures, folder / BENCH_FILE)
    print_summary(figures)
    return figures


def search_environment(folder: Path) -> dict:
    """The driver's environment, with the devices the trials of every search under `folder` reported: the driver
    may have no GPU, or another one, than the nodes the trials ran on."""
    devices = {f"{r['device']} ({r['gpu_name']})" if "gpu_name" in r else r["device"]
               for trial in folder.glob("*/trial_*") for r in layout.trial_reports(trial) if "device" in r}
    return {**environment(torch.device("cpu")), "trial_devices": sorted(devices)}


def describe(name: str) -> str:
    sampler, _, scheduler = name.partition("+")
    return {"random+fifo": "random search, full budget", "tpe+fifo": "multivariate TPE, constant liar, full budget",
            "tpe-independent+asha": "TPE one parameter at a time + ASHA (earlier default)",
            "tpe+asha": "multivariate TPE, constant liar + ASHA",
            "tpe+hyperband": "multivariate TPE, constant liar + async HyperBand"}.get(name, f"{sampler} + {scheduler}")


def search_run(experiment: Path, sampler_seed: int) -> dict:
    """One finished search of the benchmark: its trial-epochs, best, wall time and best-so-far curve (per
    trial-epoch in the order Ray received them, with the seconds since the tuner started)."""
    figures = search_figures(experiment, json.loads((experiment / layout.SEARCH_OPTIONS).read_text())["concurrency"])
    events, tuner_start = figures.pop("events"), figures.pop("tuner_start")
    return {"sampler_seed": sampler_seed, "trial_epochs": figures["trial_epochs"],
            "best_val_accuracy": figures["best_val_accuracy"], "wall_seconds": figures["wall_seconds"],
            "trials": figures["trials"], "stopped_trials": figures["stopped_trials"],
            "errored_trials": figures["errored_trials"], "overhead_share": figures["overhead_share"],
            "most_trials_at_once": figures["most_trials_at_once"], "experiment": str(experiment),
            "best_so_far": best_so_far([e[2] for e in events]).tolist(),
            "seconds": [max(0.0, e[0] - tuner_start) for e in events]}


def print_summary(figures: dict) -> None:
    """The benchmark's table: one row per strategy."""
    settings = figures["settings"]
    rows = [("strategy", "final best val acc, mean [95% CI]  |  trial-epochs  |  trial-epochs to target, median "
                         "[95% CI] (reached)  |  fraction of random's trial-epochs  |  wall s")]
    for name, strategy in figures["strategies"].items():
        summary = strategy["summary"]
        best = summary["final_best_val_accuracy"]
        interval = "" if best["ci95"] is None else f" [{best['ci95'][0]:.3f}, {best['ci95'][1]:.3f}]"
        rows.append((name, f"{best['mean']:.3f}{interval}  |  {summary['trial_epochs']['mean']:.1f}  |  "
                           f"{fmt_median_interval(summary, 'epochs_to_target')} "
                           f"({summary['epochs_to_target']['reached']}/{summary['repeats']})  |  "
                           f"{fmt_median_interval(summary, 'fraction_of_random_budget', 2)}  |  "
                           f"{summary['wall_seconds']['mean']:.1f}"))
    ray_start = figures["ray_start_seconds"]
    rows += [("target", f"{figures['target_val_accuracy']:.3f} (random's mean best - 1 pt); random's trial-epochs "
                        f"{figures['random_trial_epochs']:g}"),
             ("Ray start", "already running" if ray_start is None else f"{ray_start:.1f} s"),
             ("model build / data opening (per trial)",
              f"{figures['model_build_seconds']:.2f} s / {figures['data_open_seconds']:.3f} s"),
             ("figure", figures["figure"])]
    print_table(f"bench search: {settings['method']}, {settings['model']}, {settings['image_size_px']} px, "
                f"{settings['num_samples']} trials x {settings['max_epochs']} epochs, {settings['repeats']} repeats, "
                f"{settings['concurrency']} trials at once ({settings['experiments']})", rows)


def search_figures(experiment: Path, concurrency: int) -> dict:
    """Epochs, best accuracy, overheads and concurrency of one finished search, plus its per-epoch events in time
    order. `processes` counts the worker processes (pids) that reported, `devices` the devices they trained on;
    `most_trials_at_once`, the trials that surely ran at the same time: Ray's timestamps are whole seconds (rounded
    down), so a trial counts from the latest its first report allows (timestamp + 1 s - time_total_s) to the
    earliest its last one does."""
    trials = pd.read_csv(experiment / layout.TRIALS)
    wall_seconds = json.loads((experiment / layout.BEST).read_text())["wall_seconds"]
    events, in_trial, trial_starts, spans, pids, devices = [], [], [], [], set(), set()
    for path, train_seconds in zip(trials["path"], trials["train_seconds"]):
        results = layout.trial_reports(Path(path))
        events += [(r["timestamp"], r["epoch"], r["val_accuracy"]) for r in results]
        if results:  # Ray's trial clock starts when the trial's code does: setup, epochs, checkpoints, reports
            in_trial.append(results[-1]["time_total_s"] - train_seconds)
            trial_starts.append(results[0]["timestamp"] - results[0]["time_total_s"])
            spans.append((results[0]["timestamp"] + 1 - results[0]["time_total_s"], results[-1]["timestamp"]))
            pids |= {r["pid"] for r in results if "pid" in r}
            devices |= {r["device"] for r in results if "device" in r}
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
        "processes": len(pids), "devices": sorted(devices), "most_trials_at_once": most_at_once(spans),
        "errored_trials": int((trials["status"] == "ERROR").sum()) if "status" in trials else None,
        "stopped_trials": int((trials["status"] == "STOPPED").sum()) if "status" in trials else None,
        "experiment": str(experiment), "tuner_start": tuner_start, "events": sorted(events, key=lambda e: (e[0], e[1])),
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
