"""Reports rebuilt from what is on disk: report.md and PNG figures of a search experiment or a retrain folder.

A search report shows how every trial learned, how fast the search found its best config, which
hyperparameters mattered (Optuna's importances) and where their good values lie. A retrain report compares
the methods honestly on the test split: spread and confidence intervals over seeds and over test images, test
accuracy with and without TTA, an exact McNemar test of full fine-tuning vs LoRA on the same test images,
confusion matrices and the galaxies each method gets wrong. Figures use matplotlib's object API (no pyplot),
so writing a report never touches the backend of a notebook that imports this module.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter
from PIL import Image
from scipy import stats
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from .data import image_path, load_prepared, majority_share, open_split
from .errors import GalaxyTuneError
from .kaggle import IMAGE_SIZE_PX
from .search import STUDY_FILE

# Test accuracy (%) of the reference study (ResNet-50 pretrained on ImageNet, real Galaxy Zoo data).
REFERENCE_TEST_ACCURACY = {"direct": 68.94, "full": 88.52, "lora": 73.93}
METHOD_ORDER = ("direct", "full", "lora")
METHOD_COLORS = {"direct": "#8c8c8c", "full": "#1f77b4", "lora": "#ff7f0e"}
# What the Galaxy Zoo answers of the tasks mean, for axis labels.
CLASS_MEANINGS = {"Class1.1": "smooth", "Class1.2": "features or disk", "Class6.2": "nothing odd"}
CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
MIN_TRIALS_FOR_IMPORTANCE = 4
GALLERY_PER_METHOD = 6
DPI = 110
STATUS_STYLE = {  # trials.csv status: how its curve is drawn, and its legend label
    "COMPLETED": ({"color": "#1f77b4", "linestyle": "-", "alpha": 0.55, "linewidth": 1.3}, "ran every epoch"),
    "STOPPED": ({"color": "#9a9a9a", "linestyle": "--", "alpha": 0.9, "linewidth": 1.1}, "stopped early by ASHA"),
    "ERROR": ({"color": "#d62728", "linestyle": ":", "alpha": 0.9, "linewidth": 1.1}, "failed"),
}


class FigureSkipped(Exception):
    """A figure the data cannot support; the message says why, and the report says so instead."""


def embed(out: Path, name: str, caption: str, draw: Callable[[], Figure]) -> list[str]:
    """Markdown lines of one figure: draw it and save it as out/name, or say why it was left out."""
    path = out / name
    try:
        figure = draw()
    except FigureSkipped as why:
        path.unlink(missing_ok=True)  # never leave an earlier report's figure beside a report that omits it
        return [f"*{caption}: not drawn: {why}.*", ""]
    figure.savefig(path, dpi=DPI)
    return [f"![{path.stem.replace('_', ' ')}]({name})", "", f"*{caption}.*", ""]


def percent_axis(ax, label: str, low: float = 0, high: float = 100) -> None:
    ax.set_ylabel(label)
    ax.set_ylim(low, high)
    ax.grid(axis="y", alpha=0.3)


def class_label(name: str, short: bool = False) -> str:
    """`Class1.2 (features or disk)`, or just the meaning when `short`."""
    meaning = CLASS_MEANINGS.get(name)
    if meaning is None:
        return name
    return meaning if short else f"{name}\n({meaning})"


# ---------------------------------------------------------------- statistics


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean of `values`; None with fewer than 2 values."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def wilson_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (here: accuracy over `total` test images)."""
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int, float]:
    """(images only A gets right, images only B gets right, two-sided exact McNemar p-value).

    The images both get right or both get wrong say nothing about which is better; under "no difference"
    each discordant image is a fair coin, so the p-value is a binomial test of the discordant counts.
    """
    only_a = int(np.sum(a_correct & ~b_correct))
    only_b = int(np.sum(~a_correct & b_correct))
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def fmt_interval(interval: tuple[float, float] | None) -> str:
    """An accuracy interval in %, clipped to what accuracy can be (a t-interval of few seeds can pass 100 %)."""
    if interval is None:
        return "needs ≥ 2 seeds"
    low, high = (min(max(v, 0.0), 1.0) * 100 for v in interval)
    return f"[{low:.1f}, {high:.1f}]"


# ---------------------------------------------------------------- search report


def write_search_report(experiment: Path, out_dir: Path | None = None) -> Path:
    """report.md and figures of a search experiment (in out_dir, default the experiment); returns report.md."""
    experiment = Path(experiment)
    out = Path(out_dir or experiment)
    out.mkdir(parents=True, exist_ok=True)
    trials = pd.read_csv(experiment / "trials.csv")
    best = json.loads((experiment / "best.json").read_text())
    study = load_study(experiment)
    shown = [c for c in trials.columns if c not in ("config", "val_accuracy_curve", "path", "node_id")]
    ranked = trials.sort_values("best_val_accuracy", ascending=False)[shown]
    val_majority = majority_share(best["data"]["counts"], "val")
    lines = [
        f"# galaxy_tune search: {experiment.name}",
        "",
        (f"Method `{best['method']}`, {len(trials)} trials "
         f"({', '.join(f'{n} {s.lower()}' for s, n in trials['status'].value_counts().items())}), "
         f"backbone {best['weights']}, task `{best['data']['task']}` at {best['data']['image_size_px']} px."),
        (f"Best val accuracy {best['val_accuracy'] * 100:.2f} % (trial {best['trial_id']}, epoch {best['epoch']}) "
         f"with `{json.dumps(best['config'])}`."),
        f"Majority-class share of the val split: {val_majority * 100:.2f} %.",
        "",
        "## Figures",
        "",
        *embed(out, "val_curves.png", "Validation accuracy after each epoch, one line per trial; ASHA-stopped "
               "trials end early (dashed, ×)", lambda: plot_val_curves(trials, val_majority, experiment.name)),
        *embed(out, "best_vs_trial.png", "Best validation accuracy so far against the number of trials run",
               lambda: plot_best_vs_trial(trials, experiment.name)),
        *embed(out, "best_vs_time.png", "Best validation accuracy so far against wall-clock time",
               lambda: plot_best_vs_time(epoch_timeline(experiment, trials), experiment.name)),
        *embed(out, "param_importances.png", "Optuna's hyperparameter importances (PED-ANOVA) over the trials "
               "that ran every epoch", lambda: plot_param_importances(study, experiment.name)),
        *embed(out, "param_slices.png", "Each searched hyperparameter against the best validation accuracy of "
               "each trial", lambda: plot_param_slices(study, experiment.name)),
        "## Trials",
        "",
        ranked.to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def load_study(experiment: Path) -> optuna.Study | None:
    """The experiment's Optuna study (whatever its name, should the folder have been renamed), if any."""
    if not (experiment / STUDY_FILE).is_file():
        return None
    storage = f"sqlite:///{experiment / STUDY_FILE}"
    names = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage) if names else None


def trial_curves(trials: pd.DataFrame) -> list[list[float]]:
    """Val accuracy after each epoch of each trial, in %."""
    return [[v * 100 for v in json.loads(curve)] for curve in trials["val_accuracy_curve"]]


def plot_val_curves(trials: pd.DataFrame, val_majority: float, name: str) -> Figure:
    """Val accuracy vs epoch for every trial; stopped ones grey and dashed with an × where ASHA stopped them."""
    curves = trial_curves(trials)
    if not any(curves):
        raise FigureSkipped("no trial finished an epoch")
    figure = Figure(figsize=(8, 4.8), layout="constrained")
    ax = figure.subplots()
    best_row = int(trials["best_val_accuracy"].fillna(-1).to_numpy().argmax())
    for row, (status, curve) in enumerate(zip(trials["status"], curves)):
        if row == best_row or not curve:
            continue
        style, _ = STATUS_STYLE[status]
        epochs = np.arange(1, len(curve) + 1)
        ax.plot(epochs, curve, **style, marker="o" if len(curve) == 1 else None, markersize=3)
        if status != "COMPLETED":
            ax.plot(epochs[-1], curve[-1], marker="x", color=style["color"], markersize=8, markeredgewidth=2)
    best_curve = curves[best_row]
    ax.plot(np.arange(1, len(best_curve) + 1), best_curve, color="#d62728", linewidth=2.6, marker="o",
            markersize=4, zorder=5)
    ax.axhline(val_majority * 100, color="black", linestyle=":", linewidth=1.2)
    counts = trials["status"].value_counts()
    handles = [Line2D([], [], **STATUS_STYLE[s][0], marker="x" if s != "COMPLETED" else None,
                      label=f"{STATUS_STYLE[s][1]} ({counts[s]})") for s in STATUS_STYLE if s in counts]
    handles += [Line2D([], [], color="#d62728", linewidth=2.6, marker="o", markersize=4,
                       label=f"best trial {trials['trial_id'].iloc[best_row]}"),
                Line2D([], [], color="black", linestyle=":", label=f"majority class ({val_majority * 100:.1f} %)")]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    longest = max(len(c) for c in curves)
    ax.set_xticks(range(1, longest + 1) if longest <= 20 else np.linspace(1, longest, 10, dtype=int))
    ax.set_xlim(0.8, longest + 0.2)
    ax.set_xlabel("epoch")
    percent_axis(ax, "validation accuracy (%)", *padded_limits([v for c in curves for v in c] + [val_majority * 100]))
    ax.set_title(f"{name}: validation accuracy of every trial ({len(trials)} trials)")
    return figure


def padded_limits(values_percent: list[float]) -> tuple[float, float]:
    """y limits (%) showing every value with a margin, within 0-100."""
    low, high = min(values_percent), max(values_percent)
    margin = max(2.0, (high - low) * 0.08)
    return max(0.0, low - margin), min(102.0, high + margin)  # 102: a 100 % point stays whole


def plot_best_vs_trial(trials: pd.DataFrame, name: str) -> Figure:
    """Each trial's best val accuracy in the order trials were proposed, and the best so far as a step line."""
    scores = trials["best_val_accuracy"].to_numpy() * 100
    if np.isnan(scores).all():
        raise FigureSkipped("no trial finished an epoch")
    number = np.arange(1, len(trials) + 1)
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.subplots()
    for status, (style, label) in STATUS_STYLE.items():
        picked = (trials["status"] == status).to_numpy() & ~np.isnan(scores)
        if picked.any():
            ax.scatter(number[picked], scores[picked], color=style["color"], marker="o" if status == "COMPLETED"
                       else "x", s=36, zorder=3, label=f"{label} (its best epoch)")
    running = np.fmax.accumulate(np.nan_to_num(scores, nan=-np.inf))
    shown = np.isfinite(running)
    ax.step(number[shown], running[shown], where="post", color="#d62728", linewidth=2, label="best so far")
    ax.set_xlabel("trial number (order proposed by the sampler)")
    ax.set_xticks(number if len(number) <= 25 else np.linspace(1, len(number), 12, dtype=int))
    percent_axis(ax, "validation accuracy (%)", *padded_limits(list(scores[~np.isnan(scores)])))
    figure.legend(loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    ax.set_title(f"{name}: best validation accuracy so far, by trial")
    return figure


def epoch_timeline(experiment: Path, trials: pd.DataFrame) -> pd.DataFrame:
    """Every epoch report of every trial from Ray's result.json files: minutes since the search started and
    val accuracy (%), in time order."""
    rows = []
    for trial_path in trials["path"].dropna():
        result = Path(trial_path) / "result.json"
        if not result.is_file():  # the experiment folder was moved: look beside trials.csv
            result = experiment / Path(trial_path).name / "result.json"
        if result.is_file():
            reports = pd.DataFrame([json.loads(line) for line in result.read_text().splitlines() if line.strip()])
            if {"timestamp", "time_total_s", "val_accuracy"} <= set(reports.columns):
                rows.append(reports[["timestamp", "time_total_s", "val_accuracy"]])
    if not rows:
        return pd.DataFrame(columns=["minutes", "val_accuracy"])
    reports = pd.concat(rows)
    # timestamp is when Ray received the report; timestamp - time_total_s is when that trial started.
    started = (reports["timestamp"] - reports["time_total_s"]).min()
    return pd.DataFrame({"minutes": (reports["timestamp"] - started) / 60,
                         "val_accuracy": reports["val_accuracy"] * 100}).sort_values("minutes")


def plot_best_vs_time(timeline: pd.DataFrame, name: str) -> Figure:
    """Val accuracy of every epoch report over wall time, and the best so far as a step line."""
    if timeline.empty:
        raise FigureSkipped("no result.json with per-epoch timestamps was found in the trial folders")
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.scatter(timeline["minutes"], timeline["val_accuracy"], s=14, color="#9a9a9a", alpha=0.7,
               label="an epoch of some trial")
    # Ray's timestamps are whole seconds: reports of the same second count as one, or a false step appears.
    best_at = timeline.groupby("minutes")["val_accuracy"].max()
    running = np.maximum.accumulate(best_at.to_numpy())
    ax.step(np.append(best_at.index, best_at.index.max() * 1.02), np.append(running, running[-1]),
            where="post", color="#d62728", linewidth=2, label="best so far")
    ax.set_xlabel("wall-clock time since the search started (minutes)")
    ax.set_xlim(0, None)
    percent_axis(ax, "validation accuracy (%)", *padded_limits(list(timeline["val_accuracy"])))
    figure.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    ax.set_title(f"{name}: best validation accuracy so far, by wall time "
                 f"({timeline['minutes'].max():.1f} min in all)")
    return figure


def trial_score(trial: optuna.trial.FrozenTrial) -> float | None:
    """A trial's best val accuracy: its value, or for a pruned trial the best of its epochs."""
    if trial.value is not None:
        return trial.value
    return max(trial.intermediate_values.values(), default=None)


def plot_param_importances(study: optuna.Study | None, name: str) -> Figure:
    """Horizontal bars of Optuna's importance of each searched hyperparameter (they sum to 1)."""
    if study is None:
        raise FigureSkipped(f"no Optuna study ({STUDY_FILE}) in the experiment")
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        raise FigureSkipped(f"only {len(completed)} trial(s) ran every epoch and importances need at least "
                            f"{MIN_TRIALS_FOR_IMPORTANCE} (ASHA-stopped trials are not used): run more --num-samples")
    if len({t.value for t in completed}) == 1:
        raise FigureSkipped("every completed trial reached the same val accuracy, so no parameter explains it")
    with warnings.catch_warnings():  # PED-ANOVA warns about sparse regimes, which is the nature of small searches
        warnings.simplefilter("ignore")
        importances = optuna.importance.get_param_importances(study)
    names, values = list(importances)[::-1], list(importances.values())[::-1]
    figure = Figure(figsize=(7, 1.2 + 0.42 * len(names)), layout="constrained")
    ax = figure.subplots()
    bars = ax.barh(names, values, color="#1f77b4")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
    ax.set_xlim(0, max(values) * 1.15 + 1e-9)
    ax.set_xlabel("importance for validation accuracy (share of explained variation, sums to 1)")
    ax.set_title(f"{name}: hyperparameter importances ({len(completed)} completed trials)")
    return figure


def set_range_axis(ax, distribution) -> None:
    """An x axis spanning a numeric distribution's whole search range, logarithmic when it is sampled so."""
    low, high = distribution.low, distribution.high
    if distribution.log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # 2x10^-3, 3x10^-3... labels collide
        ax.set_xlim(low / (high / low) ** 0.05, high * (high / low) ** 0.05)
    else:
        ax.set_xlim(low - (high - low) * 0.05, high + (high - low) * 0.05)


def plot_param_slices(study: optuna.Study | None, name: str) -> Figure:
    """One panel per searched hyperparameter: its value in each trial against that trial's best val accuracy.

    Like optuna's plot_slice, but in a grid that stays readable with many parameters, log axes for
    log-sampled ones, and ASHA-stopped trials shown (grey ×, at the best epoch they reached).
    """
    if study is None:
        raise FigureSkipped(f"no Optuna study ({STUDY_FILE}) in the experiment")
    trials = [t for t in study.get_trials(deepcopy=False) if trial_score(t) is not None]
    params = list(dict.fromkeys(p for t in trials for p in t.params))
    if not params:
        raise FigureSkipped("the study has no searched parameter")
    columns = min(3, len(params))
    rows = math.ceil(len(params) / columns)
    figure = Figure(figsize=(4.2 * columns + 1, 3.1 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharey=True)
    jitter = np.random.default_rng(0)
    scores = [trial_score(t) * 100 for t in trials]
    for ax, param in zip(axes.flat, params):
        having = [(t, s) for t, s in zip(trials, scores) if param in t.params]
        distribution = having[0][0].distributions[param]
        categorical = isinstance(distribution, optuna.distributions.CategoricalDistribution)
        x = np.array([distribution.to_internal_repr(t.params[param]) for t, _ in having], dtype=float)
        if categorical:
            x += jitter.uniform(-0.12, 0.12, len(x))
            ax.set_xticks(range(len(distribution.choices)), [str(c) for c in distribution.choices])
            ax.set_xlim(-0.5, len(distribution.choices) - 0.5)
        else:
            set_range_axis(ax, distribution)
        done = np.array([t.state == optuna.trial.TrialState.COMPLETE for t, _ in having])
        y = np.array([s for _, s in having])
        number = np.array([t.number + 1 for t, _ in having])
        points = ax.scatter(x[done], y[done], c=number[done], cmap="viridis", vmin=1, vmax=len(trials),
                            s=36, edgecolor="black", linewidth=0.4, zorder=3)
        ax.scatter(x[~done], y[~done], marker="x", color="#9a9a9a", s=36, zorder=2)
        ax.set_xlabel(param + ("" if len(having) == len(trials) else
                                f" (in {len(having)} trial{'s' if len(having) > 1 else ''})"))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(params):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("best val accuracy (%)")
    figure.colorbar(points, ax=axes, label="trial number (completed trials)", shrink=min(0.8, 2.5 / rows))
    figure.suptitle(f"{name}: searched hyperparameters vs validation accuracy (grey ×: stopped by ASHA)")
    return figure


# ---------------------------------------------------------------- retrain report


def write_retrain_report(folder: Path, out_dir: Path | None = None) -> Path:
    """report.md and figures of a retrain folder (in out_dir, default the folder); returns report.md."""
    folder = Path(folder)
    out = Path(out_dir or folder)
    out.mkdir(parents=True, exist_ok=True)
    results = pd.read_csv(folder / "test_results.csv")
    predictions = pd.read_csv(folder / "test_predictions.csv")
    info = json.loads((folder / "retrain.json").read_text())
    data = info["data"]
    seeds = sorted(set(results["seed"]))
    test_images = sum(data["counts"]["test"])
    reference = REFERENCE_TEST_ACCURACY if data["task"] == "seed-top2" else {}  # the study's task only
    lines = [
        f"# galaxy_tune retrain: {folder.name}",
        "",
        (f"Task `{data['task']}` ({' vs '.join(data['class_names'])}) on `{data['data_dir']}`, "
         f"{data['image_size_px']} px images (crop {data['crop_px'] or 'none'}), split seed {data['seed']}; "
         f"test split {test_images} images. Each method was retrained with {len(seeds)} seed(s)."),
        f"Backbone: {base_weights(results['weights'].iloc[0])} (`{info['model']}`).",
        (f"Majority-class share of the test split: {info['majority_share'] * 100:.2f} % "
         "(what a model answering the larger class scores)."),
        "",
        "## Test accuracy",
        "",
        accuracy_table(results, predictions, reference).to_markdown(index=False),
        "",
        ("- *mean ± sd*: over the seeds. *95 % CI over seeds*: Student-t interval of the mean test accuracy over "
         "seeds (training randomness)" + ("; it needs ≥ 2 seeds: rerun `retrain --seeds 3`." if len(seeds) < 2
                                         else ".")),
        (f"- *95 % CI over test images*: Wilson interval of the seed-{seeds[0]} model's test accuracy over the "
         f"{test_images} test images (how far another test split of this size could move it)."),
        "- *with TTA*: logits averaged over the 8 flips and 90° rotations of each test image.",
        ("- *reference*: the reference study's test accuracy with ImageNet-pretrained ResNet-50 on the real data."
         if reference else "- No reference column: the reference study ran the `seed-top2` task only."),
        "",
        *embed(out, "test_accuracy.png", "Test accuracy per method: bars are the mean over seeds, whiskers ±1 sd, "
               "dots single seeds; black bars mark the reference study, the dotted line the majority class",
               lambda: plot_test_accuracy(results, info["majority_share"], reference)),
        "## Full fine-tuning vs LoRA",
        "",
        *full_vs_lora(predictions),
        "## Cost and provenance",
        "",
        cost_table(results).to_markdown(index=False),
        "",
        "## Errors",
        "",
        *embed(out, "confusion_matrices.png", f"Confusion matrices on the test split (seed {seeds[0]}): counts "
               "and share of each true class", lambda: plot_confusion_matrices(predictions, data["class_names"])),
        *embed(out, "misclassified.png", f"Test galaxies each method gets wrong (seed {seeds[0]}, most confident "
               "mistakes first), as the model sees them before resizing",
               lambda: plot_misclassified(predictions, data)),
        "## Recipes",
        "",
    ]
    for method, recipe in info["recipes"].items():
        lines.append(f"- **{method}** from {recipe['source']}: `{json.dumps(recipe['config'])}`")
    lines += ["", f"Library versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def base_weights(weights: str) -> str:
    """`random init tiny resnet (seed 0)` without the seed: what the backbone started from."""
    return weights.rsplit(" (seed", 1)[0]


def predicted_class(probability_1: pd.Series) -> np.ndarray:
    """Class of each image from P(class 1): argmax of two probabilities, ties going to class 0 as argmax does."""
    return (probability_1.to_numpy() > 0.5).astype(np.int64)


def seed_predictions(predictions: pd.DataFrame, method: str, seed: int) -> pd.DataFrame:
    """One method's test predictions of one seed, in GalaxyID order (the same images for every method)."""
    picked = predictions[(predictions["method"] == method) & (predictions["seed"] == seed)]
    return picked.sort_values("GalaxyID").reset_index(drop=True)


def mean_and_sd(values: pd.Series) -> str:
    return f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")


def accuracy_table(results: pd.DataFrame, predictions: pd.DataFrame,
                   reference: dict[str, float] = REFERENCE_TEST_ACCURACY) -> pd.DataFrame:
    """One row per method: test accuracy (mean ± sd, CI over seeds, CI over images, with TTA), val, reference."""
    rows = []
    for method in [m for m in METHOD_ORDER if m in set(results["method"])]:
        runs = results[results["method"] == method].sort_values("seed")
        test, tta = runs["test_accuracy"] * 100, runs["test_accuracy_tta"] * 100
        first = seed_predictions(predictions, method, int(runs["seed"].iloc[0]))
        correct = int((predicted_class(first["prob_1"]) == first["label"].to_numpy()).sum())
        rows.append({
            "method": method, "seeds": len(runs),
            "test acc %": mean_and_sd(test),
            "95 % CI over seeds": fmt_interval(t_interval(runs["test_accuracy"])),
            f"seed {int(runs['seed'].iloc[0])} test acc % [95 % CI over test images]":
                f"{correct / len(first) * 100:.2f} {fmt_interval(wilson_interval(correct, len(first)))}",
            "test acc % with TTA": mean_and_sd(tta),
            "val acc %": f"{runs['val_accuracy'].mean() * 100:.2f}",
            **({"reference test acc %": f"{reference[method]:.2f}"} if reference else {}),
        })
    return pd.DataFrame(rows)


def cost_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method: what training it took and what it started from."""
    rows = []
    for method in [m for m in METHOD_ORDER if m in set(results["method"])]:
        runs = results[results["method"] == method]
        rows.append({
            "method": method,
            "trainable params": f"{int(runs['trainable_params'].iloc[0]):,}",
            "total params": f"{int(runs['total_params'].iloc[0]):,}",
            "epochs (best epoch per seed)": "no training" if method == "direct" else
                f"{int(runs['epochs'].iloc[0])} ({', '.join(str(int(e)) for e in runs['best_epoch'])})",
            "train s per seed": f"{runs['train_seconds'].mean():.1f}",
            "images seen per seed": f"{int(runs['images_seen'].iloc[0]):,}",
            "backbone weights": base_weights(runs["weights"].iloc[0]),
            "recipe": runs["source"].iloc[0],
        })
    return pd.DataFrame(rows)


def full_vs_lora(predictions: pd.DataFrame) -> list[str]:
    """Markdown lines: McNemar's exact test of full fine-tuning vs LoRA on the same test images, per seed."""
    methods = set(predictions["method"])
    if not {"full", "lora"} <= methods:
        return ["Not compared: the retrain did not train both full fine-tuning and LoRA.", ""]
    rows, significant = [], 0
    seeds = sorted(set(predictions.loc[predictions["method"] == "full", "seed"]) &
                   set(predictions.loc[predictions["method"] == "lora", "seed"]))
    for seed in seeds:
        full, lora = seed_predictions(predictions, "full", seed), seed_predictions(predictions, "lora", seed)
        if not full["GalaxyID"].equals(lora["GalaxyID"]):
            raise GalaxyTuneError(f"full and lora seed {seed} were tested on different images: rerun the retrain")
        labels = full["label"].to_numpy()
        only_full, only_lora, p = mcnemar_exact(predicted_class(full["prob_1"]) == labels,
                                                predicted_class(lora["prob_1"]) == labels)
        significant += p < SIGNIFICANCE
        rows.append({"seed": seed, "test images": len(labels), "only full right": only_full,
                     "only LoRA right": only_lora, "exact McNemar p": f"{p:.3g}",
                     f"significant at {SIGNIFICANCE:g}": "yes" if p < SIGNIFICANCE else "no"})
    if significant == len(seeds):
        verdict = "significant in every seed"
    elif significant:
        verdict = f"significant in {significant} of {len(seeds)} seeds only, so not a robust difference"
    else:
        verdict = "not significant in any seed: this test split cannot tell the two apart"
    return [
        ("McNemar's exact test pairs the two models' answers on the same test images and counts only the images "
         "where exactly one is right (predictions without TTA); under \"no difference\" each such image is a coin "
         "flip."),
        "",
        pd.DataFrame(rows).to_markdown(index=False),
        "",
        f"**Full fine-tuning vs LoRA: the difference is {verdict}** (two-sided, α = {SIGNIFICANCE:g}).",
        "",
    ]


def plot_test_accuracy(results: pd.DataFrame, majority: float,
                       reference: dict[str, float] = REFERENCE_TEST_ACCURACY) -> Figure:
    """Bars of mean test accuracy per method, without and with TTA; sd whiskers, seed dots, reference marks."""
    methods = [m for m in METHOD_ORDER if m in set(results["method"])]
    seeds = results["seed"].nunique()
    figure = Figure(figsize=(8, 5.4), layout="constrained")
    ax = figure.subplots()
    width, top = 0.36, 100.0
    for i, method in enumerate(methods):
        runs = results[results["method"] == method]
        for offset, column, hatch, alpha in ((-width / 2, "test_accuracy", None, 1.0),
                                             (width / 2, "test_accuracy_tta", "//", 0.55)):
            values = runs[column].to_numpy() * 100
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.bar(i + offset, values.mean(), width, yerr=sd if len(values) > 1 else None, capsize=5,
                   color=METHOD_COLORS[method], alpha=alpha, hatch=hatch, edgecolor="black", linewidth=0.6)
            ax.text(i + offset, 2, f"{values.mean():.1f}", ha="center", va="bottom", fontsize=10,
                    fontweight="bold", bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.85,
                                                 "linewidth": 0})
            ax.scatter(np.full(len(values), i + offset), values, color="black", s=12, zorder=4)
            top = max(top, values.mean() + sd)
        if reference:
            ax.hlines(reference[method], i - width, i + width, color="black", linewidth=3, zorder=5)
            ax.text(i + width, reference[method], f" {reference[method]:.1f}", va="center", fontsize=9)
    ax.axhline(majority * 100, color="black", linestyle=":", linewidth=1.2)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.6, len(methods) - 0.35)
    ax.set_xlabel("method")
    percent_axis(ax, "test accuracy (%)", 0, top + 4)
    ax.set_yticks(range(0, 101, 20))
    figure.legend(handles=[
        Patch(facecolor="white", edgecolor="black", label="plain"),
        Patch(facecolor="white", edgecolor="black", hatch="//", label="with TTA (8 views)"),
        Line2D([], [], color="black", marker="o", linestyle="", markersize=4, label="single seed"),
        *([Line2D([], [], color="black", linewidth=3, label="reference study (ResNet-50, real data)")]
          if reference else []),
        Line2D([], [], color="black", linestyle=":", label=f"majority class ({majority * 100:.1f} %)"),
    ], loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    ax.set_title(f"Test accuracy per method (mean ± sd over {seeds} seeds)" if seeds > 1 else
                 "Test accuracy per method (1 seed: retrain --seeds 3 for error bars)")
    return figure


def plot_confusion_matrices(predictions: pd.DataFrame, class_names: list[str]) -> Figure:
    """One confusion matrix per method on the test split (first seed), counts and share of each true class."""
    methods = [m for m in METHOD_ORDER if m in set(predictions["method"])]
    seed = int(predictions["seed"].min())
    figure = Figure(figsize=(4.3 * len(methods), 4.4), layout="constrained")
    axes = figure.subplots(1, len(methods), squeeze=False)[0]
    labels = [class_label(name) for name in class_names]
    for ax, method in zip(axes, methods):
        picked = seed_predictions(predictions, method, seed)
        truth, guess = picked["label"].to_numpy(), predicted_class(picked["prob_1"])
        counts = confusion_matrix(truth, guess, labels=range(len(class_names)))
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        # Coloured by the share of each true class, so panels compare even though the classes differ in size.
        display = ConfusionMatrixDisplay(shares, display_labels=labels)
        display.plot(ax=ax, cmap="Blues", colorbar=False, im_kw={"vmin": 0, "vmax": 1})
        for (i, j), text in np.ndenumerate(display.text_):
            text.set_text(f"{counts[i, j]}\n{shares[i, j] * 100:.0f} %")
            text.set_fontsize(12)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{method}: {(truth == guess).mean() * 100:.1f} % correct", color=METHOD_COLORS[method],
                     fontweight="bold")
    figure.suptitle(f"Confusion matrices on the test split ({len(picked)} images, seed {seed}): "
                    "count and share of each true class")
    return figure


def galaxy_pictures(data: dict, galaxy_ids: list[int]) -> dict[int, np.ndarray]:
    """RGB pixels of test galaxies: the centre crop of the original JPEG (what the model sees before resizing),
    else the prepared pixel cache (what it sees after)."""
    crop = data["crop_px"] or IMAGE_SIZE_PX
    low, high = (IMAGE_SIZE_PX - crop) // 2, (IMAGE_SIZE_PX + crop) // 2
    pictures, missing = {}, []
    for galaxy_id in galaxy_ids:
        path = image_path(Path(data["data_dir"]), galaxy_id)
        try:
            with Image.open(path) as image:
                pictures[galaxy_id] = np.asarray(image.convert("RGB").crop((low, low, high, high)))
        except OSError:
            missing.append(galaxy_id)
    if missing:
        try:
            test = open_split(load_prepared(Path(data["prepared"]), data["image_size_px"], data["crop_px"]), "test")
        except (GalaxyTuneError, OSError):
            return pictures
        rows = dict(zip(test.galaxy_ids.tolist(), test.rows.tolist()))
        pictures.update({i: np.asarray(test.pixels[rows[i]]).transpose(1, 2, 0) for i in missing if i in rows})
    return pictures


def plot_misclassified(predictions: pd.DataFrame, data: dict) -> Figure:
    """A row of test galaxies per method that it gets wrong, each titled with its true and predicted class."""
    methods = [m for m in METHOD_ORDER if m in set(predictions["method"])]
    seed = int(predictions["seed"].min())
    class_names = data["class_names"]
    wrong, total_wrong = {}, {}
    for method in methods:
        picked = seed_predictions(predictions, method, seed)
        picked["guess"] = predicted_class(picked["prob_1"])
        picked["confidence"] = np.where(picked["guess"] == 1, picked["prob_1"], 1 - picked["prob_1"])
        mistakes = picked[picked["guess"] != picked["label"]]
        total_wrong[method] = len(mistakes)
        wrong[method] = mistakes.sort_values("confidence", ascending=False).head(GALLERY_PER_METHOD)
    pictures = galaxy_pictures(data, sorted({int(i) for m in wrong.values() for i in m["GalaxyID"]}))
    if not pictures and any(len(m) for m in wrong.values()):
        raise FigureSkipped(f"neither the JPEGs in {data['data_dir']} nor the pixel cache in {data['prepared']} "
                            "are there any more")
    figure = Figure(figsize=(1.9 * GALLERY_PER_METHOD + 0.6, 2.35 * len(methods) + 0.4), layout="constrained")
    axes = figure.subplots(len(methods), GALLERY_PER_METHOD, squeeze=False)
    for row, method in zip(axes, methods):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        row[0].set_ylabel(f"{method}\n{total_wrong[method]} wrong", fontsize=12, fontweight="bold",
                          color=METHOD_COLORS[method])
        if wrong[method].empty:
            row[0].text(0.05, 0.5, "no test errors", transform=row[0].transAxes, fontsize=11)
        for ax, mistake in zip(row, wrong[method].itertuples()):
            picture = pictures.get(int(mistake.GalaxyID))
            if picture is not None:
                ax.imshow(picture, interpolation="nearest" if picture.shape[0] < 100 else "antialiased")
            ax.set_title(f"{mistake.GalaxyID}\ntrue: {class_label(class_names[mistake.label], short=True)}\n"
                         f"said: {class_label(class_names[mistake.guess], short=True)} "
                         f"({mistake.confidence * 100:.0f} %)", fontsize=8.5)
    figure.suptitle(f"Test galaxies each method gets wrong (seed {seed}; most confident mistakes first)")
    return figure


def write_report(folder: Path, out_dir: Path | None = None) -> Path:
    """Rebuild the report of a search experiment or a retrain folder; returns its report.md."""
    folder = Path(folder)
    if (folder / "retrain.json").is_file():
        missing = [n for n in ("test_results.csv", "test_predictions.csv") if not (folder / n).is_file()]
        if missing:
            raise GalaxyTuneError(f"{folder} lacks {', '.join(missing)} (an interrupted or older retrain): "
                                  "rerun `python -m galaxy_tune retrain`")
        return write_retrain_report(folder, out_dir)
    if (folder / "trials.csv").is_file() and (folder / "best.json").is_file():
        return write_search_report(folder, out_dir)
    raise GalaxyTuneError(f"{folder} is neither a finished search experiment (trials.csv, best.json) nor a "
                          "retrain folder (retrain.json): pass one of those")
