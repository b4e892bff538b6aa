"""The report of a search experiment: how every trial learned, how fast the search found its best config, which
hyperparameters mattered (Optuna's importances) and where their good values lie.

Optuna is imported where a study is read, not with this module, so `import galaxy_tune.report` stays light.
"""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter

from .. import layout
from ..data.prepare import majority_share
from ..data.tasks import Task
from .figure import FigureSkipped, Metric, embed
from .search_curves import matching_random_curve

if TYPE_CHECKING:
    import optuna

MIN_TRIALS_FOR_IMPORTANCE = 4
STATUS_STYLE = {  # trials.csv status: how its curve is drawn, and its legend label
    "COMPLETED": ({"color": "#1f77b4", "linestyle": "-", "alpha": 0.55, "linewidth": 1.3}, "ran every epoch"),
    "STOPPED": ({"color": "#9a9a9a", "linestyle": "--", "alpha": 0.9, "linewidth": 1.1}, "stopped early by ASHA"),
    "ERROR": ({"color": "#d62728", "linestyle": ":", "alpha": 0.9, "linewidth": 1.1}, "failed"),
}


def write_search_report(experiment: Path, out_dir: Path | None = None) -> Path:
    """report.md and figures of a search experiment (in out_dir, default the experiment); returns report.md."""
    experiment = Path(experiment)
    out = Path(out_dir or experiment)
    out.mkdir(parents=True, exist_ok=True)
    trials = pd.read_csv(experiment / layout.TRIALS)
    best = json.loads((experiment / layout.BEST).read_text())
    study = load_study(experiment)
    metric = Metric.of(best)
    shown = [c for c in trials.columns if c not in ("config", f"{metric.name}_curve", "path", "node_id", "device")]
    ranked = metric.task.rank(trials)[shown]
    baseline = val_baseline(metric.task, best["data"])
    random = matching_random_curve(experiment, best, best["config"]["epochs"])
    lines = [
        f"# galaxy_tune search: {experiment.name}",
        "",
        (f"Method `{best['method']}`, {len(trials)} trials "
         f"({', '.join(f'{n} {s.lower()}' for s, n in trials['status'].value_counts().items())}), "
         f"backbone {best['weights']}, task `{best['data']['task']}` at {best['data']['image_size_px']} px."),
        (f"Best {metric.title} {metric.fmt(best[metric.name])} (trial {best['trial_id']}, epoch {best['epoch']}) "
         f"with `{json.dumps(best['config'])}`."),
        *([f"{baseline[0]} on the val split: {metric.fmt(baseline[1])}."] if baseline else []),
        "",
        "## Figures",
        "",
        *embed(out, "val_curves.png", f"{metric.title[:1].upper()}{metric.title[1:]} after each epoch, one line "
               "per trial (trials with the same curve share one, marked with their number); ASHA-stopped trials end "
               "early (dashed, ×)",
               lambda: plot_val_curves(trials, baseline, experiment.name, metric)),
        *embed(out, "best_vs_trial.png", f"Best {metric.title} so far against the number of trials run",
               lambda: plot_best_vs_trial(trials, experiment.name, metric)),
        *embed(out, "best_vs_trial_epochs.png", f"Best {metric.title} so far against the trial-epochs spent "
               "(× where ASHA stopped a trial), " + (
                   f"beside random search's mean of {random[1]['repeats']} runs on the same problem, measured by "
                   f"`bench search` in {random[1]['experiments']}" if random else
                   "alone: no `bench search` under this results folder ran the same problem (data, pixels, method, "
                   "backbone, epochs), so there is no random-search expectation to compare with"),
               lambda: plot_best_vs_trial_epochs(epoch_events(experiment, trials, metric), experiment.name, random,
                                                 metric)),
        *embed(out, "best_vs_time.png", f"Best {metric.title} so far against wall-clock time",
               lambda: plot_best_vs_time(epoch_timeline(experiment, trials, metric), experiment.name, metric)),
        *embed(out, "param_importances.png", "Optuna's hyperparameter importances (PED-ANOVA) over the trials "
               "that ran every epoch", lambda: plot_param_importances(study, experiment.name, metric)),
        *embed(out, "param_slices.png", f"Each searched hyperparameter against the best {metric.title} of "
               "each trial", lambda: plot_param_slices(study, experiment.name, metric)),
        "## Trials",
        "",
        ranked.to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    path = out / layout.REPORT
    path.write_text("\n".join(lines))
    return path


def load_study(experiment: Path) -> optuna.Study | None:
    """The experiment's Optuna study (whatever its name, should the folder have been renamed), if any."""
    if not (experiment / layout.STUDY).is_file():
        return None
    import optuna

    storage = f"sqlite:///{experiment / layout.STUDY}"
    names = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage) if names else None


def val_baseline(task: Task, data: dict) -> tuple[str, float] | None:
    """What a model that learned nothing scores on the val split of a search's `data` (its best.json's): the
    majority class's share, or the constant predictor's RMSE (from the prepared split, when it is still there)."""
    if not task.regression:
        return "Majority-class share", majority_share(data["counts"], "val")
    manifest = Path(data["prepared"]) / "splits.csv"
    if not manifest.is_file():
        return None
    manifest = pd.read_csv(manifest)
    labels, split = task.labels(manifest), manifest["split"].to_numpy()
    return "Constant predictor (training mean) RMSE", task.baseline(labels[split == "train"], labels[split == "val"])


def trial_curves(trials: pd.DataFrame, metric: Metric) -> list[list[float]]:
    """The val metric after each epoch of each trial, as shown (accuracy in %)."""
    return [list(metric.shown(json.loads(curve))) for curve in trials[f"{metric.name}_curve"]]


def plot_val_curves(trials: pd.DataFrame, baseline: tuple[str, float] | None, name: str, metric: Metric) -> Figure:
    """The val metric vs epoch for every trial; stopped ones grey and dashed with an × where ASHA stopped them."""
    curves = trial_curves(trials, metric)
    if not any(curves):
        raise FigureSkipped("no trial finished an epoch")
    figure = Figure(figsize=(8, 4.8), layout="constrained")
    ax = figure.subplots()
    best_row = metric.task.arg_best(trials[f"best_{metric.name}"])
    best_curve = curves[best_row]
    # Trials with the same curve would hide one another: each curve is drawn once, with how many trials it stands for.
    alike = Counter((status, tuple(curve)) for status, curve in zip(trials["status"], curves)
                    if curve and curve != best_curve)
    for (status, curve), count in alike.items():
        style, _ = STATUS_STYLE[status]
        epochs = np.arange(1, len(curve) + 1)
        ax.plot(epochs, curve, **style, marker="o" if len(curve) == 1 else None, markersize=3)
        if status != "COMPLETED":
            ax.plot(epochs[-1], curve[-1], marker="x", color=style["color"], markersize=8, markeredgewidth=2)
        if count > 1:
            ax.annotate(f"{count} trials", (epochs[-1], curve[-1]), xytext=(8, -4), textcoords="offset points",
                        fontsize=8, color=style["color"])
    like_best = sum(curve == best_curve for curve in curves) - 1  # the best trial's own is among them
    ax.plot(np.arange(1, len(best_curve) + 1), best_curve, color="#d62728", linewidth=2.6, marker="o",
            markersize=4, zorder=5)
    if baseline:  # under the trials: a trial flat at the baseline stays visible
        ax.axhline(metric.shown(baseline[1]), color="black", linestyle=":", linewidth=1.2, zorder=1)
    counts = trials["status"].value_counts()
    handles = [Line2D([], [], **STATUS_STYLE[s][0], marker="x" if s != "COMPLETED" else None,
                      label=f"{STATUS_STYLE[s][1]} ({counts[s]})") for s in STATUS_STYLE if s in counts]
    handles += [Line2D([], [], color="#d62728", linewidth=2.6, marker="o", markersize=4,
                       label=f"best trial {trials['trial_id'].iloc[best_row]}" + (
                           f" (+{like_best} with its curve)" if like_best else ""))]
    if baseline:
        handles.append(Line2D([], [], color="black", linestyle=":", label=(
            f"majority class ({metric.shown(baseline[1]):.1f} %)" if metric.percent
            else f"constant predictor ({baseline[1]:.3f})")))
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    longest = max(len(c) for c in curves)
    ax.set_xticks(range(1, longest + 1) if longest <= 20 else np.linspace(1, longest, 10, dtype=int))
    ax.set_xlim(0.8, longest + 0.2)
    ax.set_xlabel("epoch")
    metric.axis(ax, [v for c in curves for v in c] + ([metric.shown(baseline[1])] if baseline else []))
    ax.set_title(f"{name}: {metric.title} of every trial ({len(trials)} trials)")
    return figure


def plot_best_vs_trial(trials: pd.DataFrame, name: str, metric: Metric) -> Figure:
    """Each trial's best val metric in the order trials were proposed, and the best so far as a step line."""
    scores = metric.shown(trials[f"best_{metric.name}"])
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
    running = metric.so_far(scores)
    shown = np.isfinite(running)
    ax.step(number[shown], running[shown], where="post", color="#d62728", linewidth=2, label="best so far")
    ax.set_xlabel("trial number (order proposed by the sampler)")
    ax.set_xticks(number if len(number) <= 25 else np.linspace(1, len(number), 12, dtype=int))
    metric.axis(ax, scores[~np.isnan(scores)])
    figure.legend(loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    ax.set_title(f"{name}: best {metric.title} so far, by trial")
    return figure


def epoch_timeline(experiment: Path, trials: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """Every epoch report of every trial from Ray's result.json files: minutes since the search started and
    the val metric as shown (column `value`), in time order."""
    rows = []
    for trial_path in trials["path"].dropna():
        # When the experiment folder was moved, look beside trials.csv.
        reports = pd.DataFrame(layout.trial_reports(Path(trial_path))
                               or layout.trial_reports(experiment / Path(trial_path).name))
        if {"timestamp", "time_total_s", metric.name} <= set(reports.columns):
            rows.append(reports[["timestamp", "time_total_s", metric.name]])
    if not rows:
        return pd.DataFrame(columns=["minutes", "value"])
    reports = pd.concat(rows)
    # timestamp is when Ray received the report; timestamp - time_total_s is when that trial started.
    started = (reports["timestamp"] - reports["time_total_s"]).min()
    return pd.DataFrame({"minutes": (reports["timestamp"] - started) / 60,
                         "value": metric.shown(reports[metric.name])}).sort_values("minutes")


def plot_best_vs_time(timeline: pd.DataFrame, name: str, metric: Metric) -> Figure:
    """The val metric of every epoch report over wall time, and the best so far as a step line."""
    if timeline.empty:
        raise FigureSkipped("no result.json with per-epoch timestamps was found in the trial folders")
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.scatter(timeline["minutes"], timeline["value"], s=14, color="#9a9a9a", alpha=0.7,
               label="an epoch of some trial")
    # Ray's timestamps are whole seconds: reports of the same second count as one, or a false step appears.
    best_at = timeline.groupby("minutes")["value"].agg(metric.task.mode)
    running = metric.so_far(best_at.to_numpy())
    ax.step(np.append(best_at.index, best_at.index.max() * 1.02), np.append(running, running[-1]),
            where="post", color="#d62728", linewidth=2, label="best so far")
    ax.set_xlabel("wall-clock time since the search started (minutes)")
    ax.set_xlim(0, None)
    metric.axis(ax, timeline["value"])
    figure.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    ax.set_title(f"{name}: best {metric.title} so far, by wall time "
                 f"({timeline['minutes'].max():.1f} min in all)")
    return figure


def epoch_events(experiment: Path, trials: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """Every epoch report of every trial in the order Ray received them: the val metric as shown (`value`), the
    trial's status and whether it is the trial's last report."""
    rows = []
    for trial_path, status in zip(trials["path"], trials["status"]):
        if not isinstance(trial_path, str):
            continue
        reports = layout.trial_reports(Path(trial_path)) or layout.trial_reports(experiment / Path(trial_path).name)
        rows += [{"timestamp": r["timestamp"], "epoch": r["epoch"], "value": float(metric.shown(r[metric.name])),
                  "status": status, "last": i == len(reports) - 1} for i, r in enumerate(reports)]
    columns = ["timestamp", "epoch", "value", "status", "last"]
    return pd.DataFrame(rows, columns=columns).sort_values(["timestamp", "epoch"], kind="stable",
                                                           ignore_index=True)


def plot_best_vs_trial_epochs(events: pd.DataFrame, name: str, random: tuple[dict, dict] | None,
                              metric: Metric) -> Figure:
    """The best so far against cumulative trial-epochs, where ASHA stopped trials (×), and random search's mean
    best so far (95 % band over `bench search` repeats) on the same problem when one was measured."""
    if events.empty:
        raise FigureSkipped("no result.json with per-epoch reports was found in the trial folders")
    spent = np.arange(1, len(events) + 1)
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.scatter(spent, events["value"], s=12, color="#9a9a9a", alpha=0.6, label="an epoch of some trial")
    stopped = (events["status"] == "STOPPED").to_numpy() & events["last"].to_numpy()
    if stopped.any():
        ax.scatter(spent[stopped], events["value"][stopped], marker="x", s=40, color="black", zorder=4,
                   label="a trial stopped early by ASHA")
    ax.step(spent, metric.so_far(events["value"]), where="post", color="#d62728", linewidth=2,
            label="this search: best so far")
    values = list(events["value"])
    if random is not None:
        curve, settings = random
        mean, low, high = (metric.shown(curve[k]) for k in ("mean", "low", "high"))
        ax.step(curve["trial_epochs"], mean, where="post", color="#7f7f7f", linewidth=2, linestyle="--",
                label=f"random search, mean of {settings['repeats']} runs (bench search)")
        ax.fill_between(curve["trial_epochs"], low, high, step="post", color="#7f7f7f", alpha=0.2, linewidth=0,
                        label="its 95 % band")
        values += list(mean)
    ax.set_xlabel("trial-epochs spent (all trials, in the order they reported)")
    ax.set_xlim(0, None)
    metric.axis(ax, values)
    figure.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    ax.set_title(f"{name}: best {metric.title} so far, by compute"
                 + ("" if random else "\n(no bench search of this problem to compare with)"), fontsize=10)
    return figure


def trial_score(trial: optuna.trial.FrozenTrial, metric: Metric) -> float | None:
    """A trial's best val metric: its value, or for a pruned trial the best of its epochs."""
    if trial.value is not None:
        return trial.value
    values = list(trial.intermediate_values.values())
    return values[metric.task.arg_best(values)] if values else None


def plot_param_importances(study: optuna.Study | None, name: str, metric: Metric) -> Figure:
    """Horizontal bars of Optuna's importance of each searched hyperparameter (they sum to 1)."""
    if study is None:
        raise FigureSkipped(f"no Optuna study ({layout.STUDY}) in the experiment")
    import optuna

    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        raise FigureSkipped(f"only {len(completed)} trial(s) ran every epoch and importances need at least "
                            f"{MIN_TRIALS_FOR_IMPORTANCE} (ASHA-stopped trials are not used): run more --num-samples")
    if len({t.value for t in completed}) == 1:
        raise FigureSkipped(f"every completed trial reached the same {metric.title}, so no parameter explains it")
    with warnings.catch_warnings():  # PED-ANOVA warns about sparse regimes, which is the nature of small searches
        warnings.simplefilter("ignore")
        importances = optuna.importance.get_param_importances(study)
    names, values = list(importances)[::-1], list(importances.values())[::-1]
    figure = Figure(figsize=(7, 1.2 + 0.42 * len(names)), layout="constrained")
    ax = figure.subplots()
    bars = ax.barh(names, values, color="#1f77b4")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
    ax.set_xlim(0, max(values) * 1.15 + 1e-9)
    ax.set_xlabel(f"importance for {metric.title} (share of explained variation, sums to 1)")
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


def plot_param_slices(study: optuna.Study | None, name: str, metric: Metric) -> Figure:
    """One panel per searched hyperparameter: its value in each trial against that trial's best val metric.

    Like optuna's plot_slice, but in a grid that stays readable with many parameters, log axes for
    log-sampled ones, and ASHA-stopped trials shown (grey ×, at the best epoch they reached).
    """
    if study is None:
        raise FigureSkipped(f"no Optuna study ({layout.STUDY}) in the experiment")
    import optuna

    trials = [t for t in study.get_trials(deepcopy=False) if trial_score(t, metric) is not None]
    params = list(dict.fromkeys(p for t in trials for p in t.params))
    if not params:
        raise FigureSkipped("the study has no searched parameter")
    columns = min(3, len(params))
    rows = math.ceil(len(params) / columns)
    # Margins fixed in inches: a constrained layout takes 0.7 s more to save, at the 14 parameters of the LoRA space.
    width = 4.2 * columns + 1.3
    title = textwrap.wrap(f"{name}: searched hyperparameters vs {metric.title} (grey ×: stopped by ASHA)",
                          int(width * 10))  # characters of the 12 pt title per inch, about
    height = 3.1 * rows + 0.4 + 0.2 * len(title)
    left, right, bottom, top = 0.85 / width, 1 - 1.35 / width, 0.55 / height, 1 - (0.35 + 0.2 * len(title)) / height
    figure = Figure(figsize=(width, height))
    axes = figure.subplots(rows, columns, squeeze=False, sharey=True, gridspec_kw={
        "left": left, "right": right, "bottom": bottom, "top": top, "wspace": 0.06, "hspace": 0.3})
    jitter = np.random.default_rng(0)
    scores = list(metric.shown([trial_score(t, metric) for t in trials]))
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
        ax.set_ylabel(f"best {metric.task.metric_label} {metric.unit}")
    bar_height = (top - bottom) * min(0.8, 2.5 / rows)
    bar = figure.add_axes((right + 0.3 / width, (top + bottom - bar_height) / 2, 0.18 / width, bar_height))
    figure.colorbar(points, cax=bar, label="trial number (completed trials)", ticks=MaxNLocator(integer=True))
    figure.suptitle("\n".join(title), y=1 - 0.15 / height)
    return figure
