"""The retrain report of the `kaggle-votes` task: direct / full / LoRA scored by the competition's RMSE on the test
split.

Test RMSE over all 37 vote fractions per method, with its spread and interval over seeds and a bootstrap interval
over test images, with and without TTA, next to the constant predictor (the training split's mean fractions)
and the Kaggle winner's private-leaderboard RMSE; full fine-tuning vs LoRA as a paired bootstrap of the RMSE
difference on the same test images; the RMSE of each question; what training cost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..data.kaggle import CLASS_COLUMNS, PARENT_ANSWER, question_columns
from ..data.tasks import rmse
from .figure import METHOD_COLORS, embed
from .runs import paired_seeds, present, seed_predictions
from .stats import bootstrap, mean_and_sd, root_mean, t_interval

KAGGLE_WINNER_RMSE = 0.075  # private leaderboard, S. Dieleman 2014 (arXiv 1503.07077): real data, all 37 columns


def votes_sections(out: Path, results: pd.DataFrame, predictions: pd.DataFrame, info: dict) -> list[str]:
    """The report.md lines of a kaggle-votes retrain (after the common heading)."""
    seeds = sorted(set(results["seed"]))
    constant = info["baseline_test_rmse"]
    return [
        f"Constant predictor (every test galaxy gets the training split's mean fractions): test RMSE {constant:.4f}.",
        f"The Kaggle challenge's winner reached a private-leaderboard RMSE of about {KAGGLE_WINNER_RMSE} on the real "
        "data (other galaxies than these: a reference point, not a comparison).",
        "",
        "## Test RMSE (37 vote fractions, lower is better)",
        "",
        rmse_table(results, predictions, constant).to_markdown(index=False),
        "",
        ("- *mean ± sd*: over the seeds. *95 % CI over seeds*: Student-t interval of the mean test RMSE" +
         (" (needs ≥ 2 seeds: rerun `retrain --seeds 3`)." if len(seeds) < 2 else ".")),
        f"- *95 % CI over test images*: percentile bootstrap of the seed-{seeds[0]} model's RMSE over test galaxies.",
        "- *with TTA*: logits averaged over the 8 flips and 90° rotations of each test image.",
        "- Outputs respect the decision tree by construction (a softmax per question scaled by its parent answer).",
        "",
        *embed(out, "test_rmse.png", "Test RMSE per method: bars are the mean over seeds, whiskers ±1 sd, dots "
               "single seeds; the dotted line is the constant predictor", lambda: plot_test_rmse(results, constant)),
        "## Full fine-tuning vs LoRA",
        "",
        *full_vs_lora_rmse(predictions),
        "## Test RMSE by question",
        "",
        *question_section(predictions, Path(info["data"]["prepared"])),
    ]


def question_section(predictions: pd.DataFrame, prepared: Path) -> list[str]:
    """Where the error comes from: each question's RMSE over its answers (seed-0 models, with TTA) next to the
    constant predictor's, from the true fractions in the prepared split."""
    manifest = prepared / "splits.csv"
    if not manifest.is_file():
        return [f"Not shown: the prepared split {manifest} is gone.", ""]
    truth = pd.read_csv(manifest).set_index("GalaxyID")
    means = truth.loc[truth["split"] == "train", CLASS_COLUMNS].mean()
    seed = int(predictions["seed"].min())
    picked = {method: seed_predictions(predictions, method, seed) for method in present(predictions)}
    real = truth.loc[next(iter(picked.values()))["GalaxyID"]]  # the same test galaxies for every method
    rows = []
    for question, parent in PARENT_ANSWER.items():
        columns = question_columns(question)
        truth_q = real[columns].to_numpy()
        row = {"question": f"Class{question} ({len(columns)} answers)", "answers sum to": parent or "1",
               "constant predictor": f"{rmse(np.broadcast_to(means[columns].to_numpy(), truth_q.shape), truth_q):.4f}"}
        for method, runs in picked.items():
            row[method] = f"{rmse(runs[[f'pred_{c}' for c in columns]].to_numpy(), truth_q):.4f}"
        rows.append(row)
    return [pd.DataFrame(rows).to_markdown(index=False), "",
            f"*RMSE over each question's answers on the test split (seed-{seed} models, with TTA); later questions "
            "are asked of fewer galaxies, so their fractions, and errors, are smaller.*", ""]


def rmse_table(results: pd.DataFrame, predictions: pd.DataFrame, constant: float) -> pd.DataFrame:
    rows = []
    for method in present(results):
        runs = results[results["method"] == method].sort_values("seed")
        first = seed_predictions(predictions, method, int(runs["seed"].iloc[0]))
        value, (low, high) = bootstrap(root_mean, first["sq_error"].to_numpy())
        interval = t_interval(runs["test_rmse"])
        rows.append({
            "method": method, "seeds": len(runs),
            "test RMSE": mean_and_sd(runs["test_rmse"], 4),
            "95 % CI over seeds": "needs ≥ 2 seeds" if interval is None else
                f"[{interval[0]:.4f}, {interval[1]:.4f}]",
            f"seed {int(runs['seed'].iloc[0])} test RMSE [95 % CI over test images]":
                f"{value:.4f} [{low:.4f}, {high:.4f}]",
            "test RMSE with TTA": mean_and_sd(runs["test_rmse_tta"], 4),
            "val RMSE": f"{runs['val_rmse'].mean():.4f}",
            "vs constant predictor": f"{runs['test_rmse'].mean() / constant - 1:+.1%}",
        })
    return pd.DataFrame(rows)


def full_vs_lora_rmse(predictions: pd.DataFrame) -> list[str]:
    """Paired bootstrap of RMSE(full) - RMSE(LoRA) on the same test galaxies, per seed both methods ran."""
    if not {"full", "lora"} <= set(predictions["method"]):
        return ["Needs both full fine-tuning and LoRA in the retrain.", ""]
    lines = ["| seed | RMSE full − RMSE LoRA [95 % bootstrap CI] | verdict |", "|---|---|---|"]
    for seed, full, lora in paired_seeds(predictions):
        difference, (low, high) = bootstrap(lambda a, b: root_mean(a) - root_mean(b), full["sq_error"].to_numpy(),
                                            lora["sq_error"].to_numpy())
        verdict = "full better" if high < 0 else "LoRA better" if low > 0 else "no clear difference"
        lines.append(f"| {seed} | {difference:+.4f} [{low:+.4f}, {high:+.4f}] | {verdict} |")
    return [*lines, "", "*Negative: full fine-tuning's RMSE is lower. The interval resamples test galaxies, the "
            "same ones for both models.*", ""]


def plot_test_rmse(results: pd.DataFrame, constant: float) -> Figure:
    """Bars of mean test RMSE per method, without and with TTA; sd whiskers, seed dots, the constant predictor."""
    methods = present(results)
    seeds = results["seed"].nunique()
    figure = Figure(figsize=(8, 5.2), layout="constrained")
    ax = figure.subplots()
    width, top = 0.36, constant
    for i, method in enumerate(methods):
        runs = results[results["method"] == method]
        for offset, column, hatch, alpha in ((-width / 2, "test_rmse", None, 1.0),
                                             (width / 2, "test_rmse_tta", "//", 0.55)):
            values = runs[column].to_numpy()
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.bar(i + offset, values.mean(), width, yerr=sd if len(values) > 1 else None, capsize=5,
                   color=METHOD_COLORS[method], alpha=alpha, hatch=hatch, edgecolor="black", linewidth=0.6)
            ax.text(i + offset, values.mean() + sd, f"{values.mean():.3f}\n", ha="center", va="bottom", fontsize=9)
            ax.scatter(np.full(len(values), i + offset), values, color="black", s=12, zorder=4)
            top = max(top, values.max(), values.mean() + sd)
    ax.axhline(constant, color="black", linestyle=":", linewidth=1.2)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlabel("method")
    ax.set_ylabel("test RMSE over 37 vote fractions (lower is better)")
    ax.set_ylim(0, top * 1.18)
    ax.grid(axis="y", alpha=0.3)
    figure.legend(handles=[
        Patch(facecolor="white", edgecolor="black", label="plain"),
        Patch(facecolor="white", edgecolor="black", hatch="//", label="with TTA (8 views)"),
        Line2D([], [], color="black", marker="o", linestyle="", markersize=4, label="single seed"),
        Line2D([], [], color="black", linestyle=":", label=f"constant predictor ({constant:.3f})"),
    ], loc="outside lower center", ncols=4, fontsize=9, frameon=False)
    ax.set_title(f"Test RMSE per method (mean ± sd over {seeds} seeds)" if seeds > 1 else
                 "Test RMSE per method (1 seed: retrain --seeds 3 for error bars)")
    return figure
