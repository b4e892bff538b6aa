"""Best-so-far curves of searches and their summary over repeated runs: what `bench search` measures and draws,
and the random-search expectation a search report sets a user's search against.

Plain numbers (numpy, scipy) and matplotlib's object API; no Ray, no torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .figure import padded_limits, percent_axis
from .stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, t_interval

BENCH_FILE = "search_bench.json"  # in each `bench search` folder, results/bench/search-<time>/
COLORS = ("#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def best_so_far(values) -> np.ndarray:
    """The running maximum of val accuracies reported in time order (one per trial-epoch)."""
    return np.maximum.accumulate(np.asarray(values, dtype=float)) if len(values) else np.zeros(0)


def epochs_to_reach(curve, target: float) -> int | None:
    """Trial-epochs spent until the best so far reached `target` (None: never)."""
    reached = np.flatnonzero(np.asarray(curve, dtype=float) >= target - 1e-9)
    return int(reached[0]) + 1 if len(reached) else None


def held(curve, length: int) -> np.ndarray:
    """`curve` extended to `length` points with its last value: a finished search keeps the best it found."""
    curve = np.asarray(curve, dtype=float)
    return np.concatenate([curve, np.full(max(0, length - len(curve)), curve[-1] if len(curve) else np.nan)])


def mean_band(rows: list) -> dict:
    """Per column of equal-length rows: the mean and its 95 % Student-t interval (the mean itself for 1 row)."""
    rows = np.asarray(rows, dtype=float)
    bands = [t_interval(column) or (column.mean(), column.mean()) for column in rows.T]
    return {"mean": rows.mean(axis=0).tolist(), "low": [b[0] for b in bands], "high": [b[1] for b in bands]}


def median_interval(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(median, low, high): the median with a percentile-bootstrap interval over repeats.

    Values may be +inf (a repeat that never reached the target): they count as larger than any number, so the
    median and the interval's ends are inf when too many repeats did not get there. The ends are order statistics
    of the resampled medians (no interpolation), so an end is never a mix of a number and inf.
    """
    values = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    medians = np.median(values[draws], axis=1)  # with inf among the middle values, the median is inf
    tail = (1 - confidence) / 2 * 100
    return (float(np.median(values)), float(np.percentile(medians, tail, method="lower")),
            float(np.percentile(medians, 100 - tail, method="higher")))


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: "not reached" is written as null."""
    return None if math.isinf(value) else value


def wall_curve(runs: list[dict], step_seconds: float = 1.0) -> dict:
    """Best so far against seconds since each search's tuner started, on a common grid, over repeats; only where
    every repeat has reported an epoch."""
    end = max(run["seconds"][-1] for run in runs)
    grid = np.arange(0.0, end + step_seconds, step_seconds)
    rows = []
    for run in runs:
        seconds, curve = np.asarray(run["seconds"]), np.asarray(run["best_so_far"])
        index = np.searchsorted(seconds, grid, side="right") - 1  # the last report at or before each moment
        rows.append(np.where(index >= 0, curve[np.maximum(index, 0)], np.nan))
    shown = ~np.isnan(np.asarray(rows)).any(axis=0)
    return {"seconds": grid[shown].tolist(), **mean_band([row[shown] for row in rows])}


def summarize(runs: list[dict], target: float, budget: float) -> dict:
    """One strategy's repeats summed up: final best, trial-epochs and wall time (mean, 95 % t interval), trial-epochs
    to reach `target` (median, bootstrap interval, how many repeats reached it) also as a fraction of `budget`
    (random search's trial-epochs), and the mean best-so-far curves with their bands."""
    def mean_ci(values):
        interval = t_interval(values)
        return {"mean": float(np.mean(values)), "ci95": list(interval) if interval else None}

    to_target = [math.inf if r["epochs_to_target"] is None else r["epochs_to_target"] for r in runs]
    median, low, high = median_interval(to_target)
    longest = max(len(r["best_so_far"]) for r in runs)
    return {
        "repeats": len(runs),
        "final_best_val_accuracy": mean_ci([r["best_val_accuracy"] for r in runs]),
        "trial_epochs": mean_ci([r["trial_epochs"] for r in runs]),
        "wall_seconds": mean_ci([r["wall_seconds"] for r in runs]),
        "epochs_to_target": {"median": finite_or_none(median), "ci95": [finite_or_none(low), finite_or_none(high)],
                             "reached": sum(not math.isinf(v) for v in to_target)},
        "fraction_of_random_budget": {"median": finite_or_none(median / budget),
                                      "ci95": [finite_or_none(low / budget), finite_or_none(high / budget)]},
        "curve": {"trial_epochs": list(range(1, longest + 1)),
                  **mean_band([held(r["best_so_far"], longest) for r in runs])},
        "wall_curve": wall_curve(runs),
    }


def fmt_median_interval(summary: dict, key: str, digits: int = 0) -> str:
    """`24 [16, 40]` from a summary's median and interval; `not reached` / `not bounded` for a missing value."""
    part = summary[key]

    def one(value, missing):
        return missing if value is None else f"{value:.{digits}f}"

    return f"{one(part['median'], 'not reached')} [{one(part['ci95'][0], '?')}, {one(part['ci95'][1], 'not bounded')}]"


def matching_random_curve(experiment: Path, best: dict, max_epochs: int) -> tuple[dict, dict] | None:
    """Random search's mean best-so-far curve from the latest `bench search` on the same problem as `experiment`
    (same prepared data and pixels, method, backbone and epoch budget), with that benchmark's settings; None when
    no benchmark under the experiment's results folder ran that problem."""
    for path in sorted(experiment.parent.glob(f"bench/search-*/{BENCH_FILE}"), reverse=True):
        figures = json.loads(path.read_text())
        settings = figures.get("settings", {})
        same = (settings.get("prepared") == best["data"]["prepared"] and settings.get("method") == best["method"]
                and settings.get("model") == best["model"] and settings.get("max_epochs") == max_epochs)
        baseline = figures.get("strategies", {}).get(figures.get("baseline"))
        if same and baseline:
            return baseline["summary"]["curve"], settings
    return None


def plot_search_benchmark(figures: dict) -> Figure:
    """Three panels: mean best-so-far (95 % band) against trial-epochs and against wall time per strategy, and each
    strategy's trial-epochs to reach random search's best - 1 point (every repeat, median and its interval)."""
    settings, strategies = figures["settings"], figures["strategies"]
    budget, target = figures["random_trial_epochs"], figures["target_val_accuracy"] * 100
    repeats = settings["repeats"]
    figure = Figure(figsize=(13, 9.5), layout="constrained")
    grid = figure.add_gridspec(2, 2, height_ratios=[1.25, 1])
    by_epochs, by_time, to_target = (figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1]),
                                     figure.add_subplot(grid[1, :]))
    values = [target]
    for color, (name, strategy) in zip(COLORS, strategies.items()):
        summary = strategy["summary"]
        for ax, curve, x in ((by_epochs, summary["curve"], "trial_epochs"),
                             (by_time, summary["wall_curve"], "seconds")):
            mean, low, high = (np.asarray(curve[k]) * 100 for k in ("mean", "low", "high"))
            ax.plot(curve[x], mean, color=color, linewidth=2, drawstyle="steps-post",
                    label=f"{name}: {strategy['about']}")
            ax.fill_between(curve[x], np.clip(low, 0, 100), np.clip(high, 0, 100), color=color, alpha=0.12,
                            linewidth=0, step="post")
            values += list(mean[len(mean) // 10:])
    for ax in (by_epochs, by_time):
        ax.axhline(target, color="black", linestyle="--", linewidth=1.2)
        percent_axis(ax, "best validation accuracy so far (%)", *padded_limits(values))
        ax.set_xlim(0, None)
    by_epochs.text(0.99, target, f"target {target:.1f} %", transform=by_epochs.get_yaxis_transform(), ha="right",
                   va="bottom", fontsize=9)
    for share, label, height in ((1 / 3, "⅓", 0.02), (1 / 2, "½", 0.12)):
        by_epochs.axvline(budget * share, color="black", linestyle=":", linewidth=1)
        by_epochs.text(budget * share, height, f" {label} of random's\n trial-epochs", fontsize=8, va="bottom",
                       transform=by_epochs.get_xaxis_transform())
    by_epochs.set_xlabel("trial-epochs spent (all trials, in the order they finished)")
    by_epochs.set_title("against compute")
    by_time.set_xlabel(f"seconds since the search started ({settings['concurrency']} trials at once)")
    by_time.set_title("against wall time")

    names = list(strategies)
    for row, (color, name) in enumerate(zip(COLORS, names)):
        summary = strategies[name]["summary"]["epochs_to_target"]
        spent = [r["epochs_to_target"] for r in strategies[name]["runs"]]
        jitter = np.linspace(-0.18, 0.18, len(spent)) if len(spent) > 1 else [0.0]
        for y, value in zip(row + np.asarray(jitter), spent):
            if value is None:
                to_target.plot(budget * 1.04, y, marker="x", color=color, markersize=7)
            else:
                to_target.plot(value, y, marker="o", color=color, alpha=0.6, markersize=5)
        low, high = summary["ci95"]
        if summary["median"] is not None:
            right = budget * 1.04 if high is None else high
            to_target.plot([low, right], [row, row], color=color, linewidth=6, alpha=0.35, solid_capstyle="butt")
            to_target.plot(summary["median"], row, marker="|", color="black", markersize=18, markeredgewidth=2.5)
        to_target.text(budget * 1.08, row, f"reached {summary['reached']}/{len(spent)}", va="center", fontsize=9)
    to_target.axvline(budget, color="black", linewidth=1)
    for share in (1 / 3, 1 / 2):
        to_target.axvline(budget * share, color="black", linestyle=":", linewidth=1)
    to_target.set_yticks(range(len(names)), names)
    to_target.invert_yaxis()
    to_target.set_xlim(0, budget * 1.2)
    to_target.set_xlabel(f"trial-epochs until the best so far reached {target:.1f} % (random search's budget: "
                         f"{budget:g}; × beyond it: never reached)")
    to_target.set_title("trial-epochs to reach random search's best − 1 point: each repeat (dots), median (black "
                        "bar) and its 95 % bootstrap interval (band)")
    handles = [Line2D([], [], color="black", linestyle="--", label="target: random search's mean best − 1 point"),
               Patch(color="#7f7f7f", alpha=0.3, label="shaded: 95 % t interval of the mean over repeats")]
    figure.legend(handles=by_epochs.get_legend_handles_labels()[0] + handles, loc="outside lower center", ncols=2,
                  fontsize=9, frameon=False)
    figure.suptitle(f"bench search: {settings['method']} fine-tuning, {settings['model']} ResNet, "
                    f"{settings['image_size_px']} px, {settings['num_samples']} trials × {settings['max_epochs']} "
                    f"epochs; mean best so far of {repeats} repeats with 95 % band", fontsize=12)
    return figure
