"""Figures of the evaluation sections: winner's curse, accuracy by vote consensus, reliability diagrams, selective
prediction and the cost-accuracy frontier."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator

from ..models.calibration import probabilities, reliability
from .figure import METHOD_COLORS, METHOD_ORDER, FigureSkipped, Metric, padded_limits, percent_axis
from .backbones import backbones, short_name
from .runs import correct_and_confidence, logits_of, present, seed_predictions
from .stats import coverage_curve, largest_coverage, wilson_interval

STAGES = ("search val\n(best trial)", "retrained val\n(mean over seeds)", "test\n(mean over seeds)")
BEFORE_COLOR = "#555555"


def label_points(ax, points: list[tuple[float, float, int, bool]], color: str, fontsize: float = 10,
                 names: dict[int, str] | None = None) -> None:
    """Label config points (x, y, search rank, selected) right of them, e.g. `#1 selected, #2` where points
    coincide. Each rank is followed by its name in `names`, if given (e.g. its backbone). A label that would cover
    another label or point moves up, joined to its point by a thin line. Call once the axes' limits are set."""
    to_axes = ax.transScale + ax.transLimits  # data to axes fractions, whatever the layout
    places: dict[tuple[float, float], list[tuple[int, bool]]] = {}  # points within 1 % of the axis coincide
    for x, y, rank, chosen in points:
        place = to_axes.transform((x, y))
        places.setdefault((round(place[0], 2), round(place[1], 2)), []).append((rank, chosen))
    box = ax.get_position()
    char = fontsize * 0.62 / 72 / (box.width * ax.figure.get_figwidth())  # one character, in axes fractions
    height = fontsize * 1.5 / 72 / (box.height * ax.figure.get_figheight())
    taken = [(x - char, y - height / 2, x + char, y + height / 2) for x, y in places]
    for (x, y), configs in sorted(places.items(), key=lambda p: p[0][::-1]):
        text = ", ".join(f"#{r}" + (f" {names[r]}" if names else "") + (" selected" if c else "")
                         for r, c in sorted(configs))
        gap = 2.5 if any(c for _, c in configs) else 1.5  # clear of the selected config's larger marker
        left, right, level = x + gap * char, x + (gap + len(text)) * char, y
        while any(left < t[2] and right > t[0] and level - height / 2 < t[3] and level + height / 2 > t[1]
                  for t in taken):
            level += height / 2
        taken.append((left, level - height / 2, right, level + height / 2))
        ax.text(left, level, text, transform=ax.transAxes, va="center", fontsize=fontsize, color=color,
                fontweight="bold" if any(c for _, c in configs) else "normal",
                bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "alpha": 0.8, "linewidth": 0})
        if level != y:
            ax.plot([x, left], [y, level], transform=ax.transAxes, color=color, linewidth=0.6)


def legend_below(figure: Figure, handles: list, ncols: int = 3) -> None:
    figure.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=9, frameon=False)


def plot_winners_curse(trained: pd.DataFrame, metric: Metric) -> Figure:
    """One panel per trained method: each config's search val, retrained val and test metric, joined by a line."""
    methods = present(trained)
    if not methods:
        raise FigureSkipped("the retrain trained neither full fine-tuning nor LoRA")
    figure = Figure(figsize=(5.2 * len(methods) + 0.6, 5.2), layout="constrained")
    axes = figure.subplots(1, len(methods), squeeze=False, sharey=True)[0]
    values, ends = [], {}
    for ax, method in zip(axes, methods):
        runs = trained[trained["method"] == method]
        ends[method] = []
        for rank, config in runs.groupby("rank"):
            points = metric.shown([config[f"search_{metric.name}"].iloc[0], config[metric.name].mean(),
                                   config[f"test_{metric.task.metric}"].mean()])
            chosen = bool(config["selected"].any())
            ax.plot(range(3), points, color=METHOD_COLORS[method], marker="o", markersize=8 if chosen else 5,
                    linewidth=3.2 if chosen else 1.2, alpha=1.0 if chosen else 0.6, zorder=3 if chosen else 2)
            ends[method].append((2, points[2], int(rank), chosen))
            if np.isnan(points[0]):
                ax.text(0, np.nanmean(points), "no search:\nreference\nrecipe", ha="center", va="center",
                        fontsize=10, color="dimgray")
            values += [v for v in points if not np.isnan(v)]
        ax.set_xticks(range(3), STAGES)
        ax.set_xlim(-0.3, 3.3)
        ax.grid(axis="y", alpha=0.3)
        configs, seeds = runs["rank"].nunique(), runs["seed"].nunique()
        ax.set_title(f"{method}: {configs} config{'s' * (configs > 1)}, {seeds} seed{'s' * (seeds > 1)}",
                     color=METHOD_COLORS[method], fontweight="bold")
    metric.axis(axes[0], values, label=f"{metric.task.metric_name} {metric.unit}")
    for ax, method in zip(axes, methods):
        label_points(ax, ends[method], METHOD_COLORS[method])
    legend_below(figure, [
        Line2D([], [], color="black", linewidth=3.2, marker="o", label="selected on val (reported)"),
        Line2D([], [], color="black", linewidth=1.2, marker="o", alpha=0.6,
               label="other top configs (#k: search rank)"),
    ], ncols=min(2, len(methods)))  # one panel: too narrow for both side by side
    figure.suptitle(f"Winner's curse: the search's {metric.task.metric_name} against the same configs retrained")
    return figure


def plot_consensus(counts: dict[str, list[tuple[int, int]]], bins: tuple[str, ...], seed: int) -> Figure:
    """Grouped bars: test accuracy per vote-consensus bin and method, Wilson 95 % whiskers, n per bin."""
    methods = list(counts)
    figure = Figure(figsize=(8.5, 5.4), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        for i, (n, right) in enumerate(counts[method][:len(bins)]):
            if not n:
                if j == 0:
                    ax.text(i, 50, "no test galaxies", ha="center", fontsize=10, color="dimgray")
                continue
            x, accuracy = i + (j - (len(methods) - 1) / 2) * width, right / n * 100
            low, high = (v * 100 for v in wilson_interval(right, n))
            ax.bar(x, accuracy, width * 0.92, color=METHOD_COLORS[method], edgecolor="black", linewidth=0.6)
            whiskers = [[max(accuracy - low, 0)], [max(high - accuracy, 0)]]  # 0 at 0 % or 100 %, not -1e-15
            ax.errorbar(x, accuracy, yerr=whiskers, color="black", capsize=4, linewidth=1.2)
            ax.text(x, 2, f"{accuracy:.1f}", ha="center", va="bottom", fontsize=9, fontweight="bold",
                    bbox={"boxstyle": "round,pad=0.12", "facecolor": "white", "alpha": 0.85, "linewidth": 0})
    galaxies = [n for n, _ in counts[methods[0]]]
    ax.set_xticks(range(len(bins)), [f"{name}\n(n = {n})" for name, n in zip(bins, galaxies)])
    ax.set_xlim(-0.5, len(bins) - 0.5)
    ax.set_xlabel("vote fraction of the winning answer (how decisive the volunteers were)")
    percent_axis(ax, "test accuracy (%)", 0, 105)
    ax.set_yticks(range(0, 101, 20))
    legend_below(figure, [*(Patch(facecolor=METHOD_COLORS[m], edgecolor="black", label=m) for m in methods),
                          Line2D([], [], color="black", label="95 % Wilson interval")], ncols=len(methods) + 1)
    figure.suptitle(f"Test accuracy by volunteer consensus (seed {seed}, selected configs)")
    return figure


def plot_reliability(predictions: pd.DataFrame, results: pd.DataFrame, seed: int) -> Figure:
    """One reliability diagram per method: accuracy against mean confidence per bin, before and after the
    val-fitted temperature, dot area by number of galaxies."""
    methods = present(predictions)
    figure = Figure(figsize=(4.2 * len(methods) + 0.4, 5.0), layout="constrained")
    axes = figure.subplots(1, len(methods), squeeze=False, sharey=True)[0]
    for ax, method in zip(axes, methods):
        picked = seed_predictions(predictions, method, seed)
        run = results[(results["method"] == method) & (results["seed"] == seed)].iloc[0]
        logits, labels = logits_of(picked), picked["label"].to_numpy()
        low, errors = 100 / logits.shape[1], []
        ax.plot([low, 100], [low, 100], color="black", linestyle=":", linewidth=1)
        for temperature, color, face, style in ((1.0, BEFORE_COLOR, "white", "--"),
                                                (run["temperature"], METHOD_COLORS[method], None, "-")):
            error, rows = reliability(probabilities(logits, temperature), labels)
            confidence = np.array([r["confidence"] for r in rows]) * 100
            accuracy = np.array([r["accuracy"] for r in rows]) * 100
            ax.plot(confidence, accuracy, color=color, linestyle=style, linewidth=1.6)
            ax.scatter(confidence, accuracy, s=[25 + 220 * r["count"] / len(labels) for r in rows],
                       facecolor=face or color, edgecolor=color if face else "black", linewidth=1.2, zorder=3)
            errors.append(error * 100)
        ax.set_xlim(low - 2, 101)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("confidence (%)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{method}: ECE {errors[0]:.1f} % → {errors[1]:.1f} %\n(T = {run['temperature']:.2f})",
                     color=METHOD_COLORS[method], fontweight="bold")
    axes[0].set_ylabel("accuracy (%)")
    legend_below(figure, [
        Line2D([], [], color=BEFORE_COLOR, linestyle="--", marker="o", markerfacecolor="white",
               label="before: softmax of the logits"),
        Line2D([], [], color="black", linestyle="-", marker="o", label="after: logits / T (T fitted on val)"),
        Line2D([], [], color="black", linestyle=":", label="perfectly calibrated")])
    figure.suptitle(f"Reliability on the test split (seed {seed}, selected configs): accuracy against confidence")
    return figure


def plot_coverage(predictions: pd.DataFrame, seed: int, targets: tuple[float, ...]) -> Figure:
    """Accuracy of the most confident galaxies against the share kept, per method; the largest share reaching
    each target accuracy marked."""
    figure = Figure(figsize=(8.5, 5.4), layout="constrained")
    ax = figure.subplots()
    lowest, methods = 100.0, present(predictions)
    for i, method in enumerate(methods):
        correct, confidence = correct_and_confidence(seed_predictions(predictions, method, seed))
        coverage, accuracy = coverage_curve(confidence, correct)
        # Drawn first, drawn thickest: curves that coincide show as nested stripes.
        ax.plot(coverage * 100, accuracy * 100, color=METHOD_COLORS[method],
                linewidth=1.6 + (len(methods) - i - 1), label=f"{method} (all: {accuracy[-1] * 100:.1f} %)")
        lowest = min(lowest, accuracy[coverage >= 0.1].min() * 100)
        for target, marker in zip(targets, ("o", "s")):
            share = largest_coverage(coverage, accuracy, target)
            if share:
                ax.plot(share * 100, accuracy[coverage == share][0] * 100, marker=marker, markersize=9,
                        color=METHOD_COLORS[method], markeredgecolor="black", zorder=4)
    for target, marker in zip(targets, ("o", "s")):
        ax.axhline(target * 100, color="black", linestyle=":", linewidth=1)
        ax.annotate(f"{target * 100:.0f} %", (1, target * 100), xycoords=("axes fraction", "data"), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.set_xlim(0, 101)
    ax.set_xlabel("galaxies kept, most confident first (coverage, %)")
    percent_axis(ax, "accuracy of the kept galaxies (%)", max(0.0, min(lowest, 90.0) - 5), 102)
    ax.grid(axis="x", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    legend_below(figure, [*handles, *(Line2D([], [], color="white", marker=m, markeredgecolor="black",
                                             markersize=8, label=f"largest share at ≥ {t * 100:.0f} % accuracy")
                                      for t, m in zip(targets, ("o", "s")))], ncols=3)
    figure.suptitle(f"Selective prediction: accuracy against coverage (seed {seed}, selected configs)")
    return figure


def plot_frontier(all_results: pd.DataFrame, majority: float) -> Figure:
    """Test accuracy against trainable parameters (log) for every retrained config and seed; each config's mean
    labelled with its search rank, the selected configs ringed; the direct baseline as a line."""
    trained = all_results[all_results["method"] != "direct"]
    if trained.empty:
        raise FigureSkipped("the retrain trained neither full fine-tuning nor LoRA")
    figure = Figure(figsize=(8.5, 5.6), layout="constrained")
    ax = figure.subplots()
    values, configs = list(trained["test_accuracy"] * 100) + [majority * 100], {}
    several = len(backbones(all_results)) > 1  # a search chose the backbone: name it at each point
    names = {}
    for method in [m for m in METHOD_ORDER if m in set(trained["method"])]:
        runs = trained[trained["method"] == method]
        ax.scatter(runs["trainable_params"], runs["test_accuracy"] * 100, color=METHOD_COLORS[method], s=22,
                   alpha=0.45, linewidth=0)
        configs[method] = []
        names[method] = {int(r): short_name(m) for r, m in zip(runs["rank"], runs["model"])} if several else None
        for rank, config in runs.groupby("rank"):
            x, y, chosen = config["trainable_params"].iloc[0], config["test_accuracy"].mean() * 100, \
                bool(config["selected"].any())
            ax.scatter(x, y, color=METHOD_COLORS[method], s=150 if chosen else 70, marker="D" if chosen else "o",
                       edgecolor="black", linewidth=2 if chosen else 0.6, zorder=5 if chosen else 4)
            configs[method].append((x, y, int(rank), chosen))
    direct_runs = all_results[all_results["method"] == "direct"]
    for model, runs in direct_runs.groupby("model" if several else "method", sort=False):  # one line per backbone
        level = runs["test_accuracy"].mean() * 100
        ax.axhline(level, color=METHOD_COLORS["direct"], linestyle="--", linewidth=2)
        ax.annotate(f"direct{f' {short_name(model)}' if several else ''}: {level:.1f} %", (0.01, level),
                    xycoords=("axes fraction", "data"), va="bottom", fontsize=9, color="dimgray")
        values.append(level)
    ax.axhline(majority * 100, color="black", linestyle=":", linewidth=1.2)
    ax.set_xscale("log")
    low, high = trained["trainable_params"].min(), trained["trainable_params"].max()
    ax.set_xlim(low / 3, high * 3)
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else
                                               f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("trainable parameters (log scale)")
    percent_axis(ax, "test accuracy (%)", *padded_limits(values))
    ax.grid(axis="x", which="major", alpha=0.3)
    for method, points in configs.items():
        label_points(ax, points, "black", names=names[method])
    legend_below(figure, [
        *(Line2D([], [], color=METHOD_COLORS[m], marker="o", linestyle="", label=m)
          for m in METHOD_ORDER if m in set(trained["method"])),
        Line2D([], [], color="gray", marker="o", linestyle="", alpha=0.45, markersize=5, label="one seed"),
        Line2D([], [], color="gray", marker="o", linestyle="", markeredgecolor="black", markersize=8,
               label="config mean (#k: search rank)"),
        Line2D([], [], color="gray", marker="D", linestyle="", markeredgecolor="black", markeredgewidth=2,
               markersize=9, label="selected on val"),
        *([Line2D([], [], color=METHOD_COLORS["direct"], linestyle="--", linewidth=2,
                  label="direct (0 trainable: no training)")] if not direct_runs.empty else []),
        Line2D([], [], color="black", linestyle=":", label=f"majority class ({majority * 100:.1f} %)"),
    ], ncols=4)
    ax.set_title("What LoRA buys: test accuracy against trainable parameters")
    return figure
