"""The evaluation a Galaxy Zoo referee expects, as sections of the retrain report.

The top-k selection and the winner's curse, full fine-tuning vs LoRA (McNemar and a paired bootstrap), accuracy by
vote consensus, calibration before and after temperature scaling, selective prediction and the cost-accuracy
frontier. The cheap per-run numbers (method, rank, seed) go to test_evaluation.csv beside report.md, so
test_results.csv stays as the retrain wrote it. Each section says in one line why it is left out when the retrain
folder predates what it needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import layout
from ..models.calibration import nll, probabilities, reliability
from ..data.prepare import read_consensus
from ..errors import GalaxyTuneError
from .evaluation_figures import (plot_consensus, plot_coverage, plot_frontier, plot_reliability,
                                 plot_winners_curse)
from .figure import METHOD_ORDER, FigureSkipped, Metric, embed
from .runs import correct_and_confidence, logits_of, paired_seeds, present, seed_predictions, with_ranks
from .stats import (BOOTSTRAP_RESAMPLES, SIGNIFICANCE, coverage_curve, fmt_interval, largest_coverage,
                    mcnemar_exact, mean_and_sd, paired_bootstrap, wilson_interval)

CONSENSUS_EDGES = (0.5, 0.8)
CONSENSUS_BINS = ("< 0.5", "0.5–0.8", "≥ 0.8")
CONSENSUS_COLUMNS = ("below_0.5", "0.5_to_0.8", "from_0.8")  # the bins in test_evaluation.csv's column names
COVERAGE_TARGETS = (0.95, 0.99)
REPORTED_COVERAGE = 0.8
RETRAIN_AGAIN = "rerun `python -m galaxy_tune retrain` for it"


def not_shown(out: Path, figure: str, why: str) -> list[str]:
    """The line a section gives instead of its content; its figure from an earlier report goes too."""
    (out / figure).unlink(missing_ok=True)
    return [f"*Not shown: {why}.*", ""]


def calibration_missing(results: pd.DataFrame, predictions: pd.DataFrame) -> str | None:
    if "temperature" not in results or not any(c.startswith("logit_") for c in predictions):
        return f"this retrain predates temperature scaling (no temperature or logits saved): {RETRAIN_AGAIN}"
    return None


def consensus_by_galaxy(predictions: pd.DataFrame, data: dict) -> pd.Series:
    """The winning answer's vote fraction per test GalaxyID from the Kaggle CSV: as the retrain recorded it, else
    read again from the data folder (retrains from before it recorded them)."""
    if "consensus" in predictions and predictions["consensus"].notna().any():
        return predictions.drop_duplicates("GalaxyID").set_index("GalaxyID")["consensus"]
    try:
        return read_consensus(Path(data["data_dir"]), data["task"])
    except GalaxyTuneError as why:
        raise FigureSkipped(f"the retrain recorded no vote fractions and the Kaggle CSV is unreadable: {why}"
                            ) from None


def consensus_bin(consensus: np.ndarray) -> np.ndarray:
    """Bin index of each vote fraction: 0 for < 0.5, 1 for 0.5-0.8, 2 for ≥ 0.8, -1 when unknown (NaN)."""
    return np.where(np.isnan(consensus), -1, np.digitize(np.nan_to_num(consensus), CONSENSUS_EDGES))


def run_metrics(results: pd.DataFrame, predictions: pd.DataFrame, consensus: pd.Series | None) -> pd.DataFrame:
    """test_evaluation.csv: per run, test ECE and NLL before and after the val-fitted temperature, selective
    prediction and accuracy by vote consensus (fractions 0-1; NaN where the folder cannot tell)."""
    calibrated = calibration_missing(results, predictions) is None
    rows = []
    for run in results.itertuples(index=False):
        picked = seed_predictions(predictions, run.method, run.seed, run.rank)
        correct, confidence = correct_and_confidence(picked)
        coverage, accuracy = coverage_curve(confidence, correct)
        at_coverage = accuracy[coverage <= REPORTED_COVERAGE + 1e-12]
        row = {"method": run.method, "rank": run.rank, "seed": run.seed, "selected": run.selected,
               "test_images": len(picked), "test_accuracy": correct.mean()}
        if calibrated:
            logits, labels = logits_of(picked), picked["label"].to_numpy()
            row.update(temperature=run.temperature,
                       test_ece=reliability(probabilities(logits), labels)[0],
                       test_ece_calibrated=reliability(probabilities(logits, run.temperature), labels)[0],
                       test_nll=nll(logits, labels), test_nll_calibrated=nll(logits, labels, run.temperature))
        row.update({f"coverage_at_{target * 100:.0f}": largest_coverage(coverage, accuracy, target)
                    for target in COVERAGE_TARGETS})
        row[f"accuracy_at_coverage_{REPORTED_COVERAGE * 100:.0f}"] = at_coverage[-1] if len(at_coverage) else np.nan
        if consensus is not None:
            bins = consensus_bin(consensus.reindex(picked["GalaxyID"]).to_numpy(dtype=float))
            row.update({f"accuracy_consensus_{name}": correct[bins == i].mean() if (bins == i).any() else np.nan
                        for i, name in enumerate(CONSENSUS_COLUMNS)})
        rows.append(row)
    return pd.DataFrame(rows)


def evaluation_sections(out: Path, all_results: pd.DataFrame, all_predictions: pd.DataFrame, info: dict) -> list[str]:
    """Markdown of the referee's sections (consensus, calibration, selective prediction, frontier) over each
    method's selected config; writes test_evaluation.csv over every run."""
    all_results, all_predictions = with_ranks(all_results), with_ranks(all_predictions)
    results = all_results[all_results["selected"]].reset_index(drop=True)
    predictions = all_predictions.merge(results[["method", "rank"]].drop_duplicates(), on=["method", "rank"])
    try:
        consensus, no_consensus = consensus_by_galaxy(all_predictions, info["data"]), ""
    except FigureSkipped as why:
        consensus, no_consensus = None, str(why)
    metrics = run_metrics(all_results, all_predictions, consensus)
    metrics.to_csv(out / layout.EVALUATION, index=False)
    chosen = metrics[metrics["selected"]]
    seed = int(chosen["seed"].min())
    return [
        "## Accuracy by vote consensus", "",
        *(consensus_section(out, predictions, consensus, seed) if consensus is not None else
          not_shown(out, "accuracy_by_consensus.png", no_consensus)),
        "## Calibration", "",
        *calibration_section(out, all_results, predictions, chosen, seed),
        "## Selective prediction", "",
        (f"Keep the galaxies the model is most confident about and leave the rest to volunteers: accuracy of the "
         f"kept galaxies against the share kept (seed {seed}, selected configs). With two classes temperature "
         "scaling does not move this curve: it keeps the order of confidences."),
        "", selective_table(chosen[chosen["seed"] == seed].set_index("method")).to_markdown(index=False), "",
        *embed(out, "selective_prediction.png", "Accuracy of the most confident galaxies against the share kept; "
               "marks: the most a method can take automatically at 95 % and 99 % accuracy",
               lambda: plot_coverage(predictions, seed, COVERAGE_TARGETS)),
        "## Cost–accuracy frontier", "",
        *frontier_lines(all_results),
        *embed(out, "cost_accuracy_frontier.png", "Test accuracy against trainable parameters (log scale) of "
               "every retrained config and seed; the direct baseline trains none",
               lambda: plot_frontier(all_results, info["majority_share"])),
        f"Per-run numbers of these sections (every method, config rank and seed): `{layout.EVALUATION}`.", "",
    ]


def consensus_section(out: Path, predictions: pd.DataFrame, consensus: pd.Series, seed: int) -> list[str]:
    counts = consensus_counts(predictions, consensus, seed)
    unknown = predictions["GalaxyID"].nunique() - next(iter(counts.values()))[-1][0]
    return [
        (f"Test galaxies binned by how decisive the volunteers were: the winning answer's vote fraction for the "
         f"task in the Kaggle CSV. Seed-{seed} models of each method's selected config; accuracy % with the 95 % "
         "Wilson interval over the galaxies of the bin."
         + (f" {unknown} test galaxies have no vote fraction in the CSV and are left out." if unknown else "")),
        "", consensus_table(counts).to_markdown(index=False), "",
        *embed(out, "accuracy_by_consensus.png", "Test accuracy per vote-consensus bin: whiskers are 95 % Wilson "
               "intervals, n the galaxies in the bin", lambda: plot_consensus(counts, CONSENSUS_BINS, seed)),
    ]


def calibration_section(out: Path, all_results: pd.DataFrame, predictions: pd.DataFrame, chosen: pd.DataFrame,
                        seed: int) -> list[str]:
    missing = calibration_missing(all_results, predictions)
    if missing:
        return not_shown(out, "reliability.png", missing)
    return [
        ("Expected calibration error (ECE, 10 confidence bins) and NLL on the test split, before and after "
         "dividing the logits by the temperature fitted on the val split (folded into the exported models); "
         "mean ± sd over seeds of each method's selected config. With few test images the ECE is noisy."),
        "", calibration_table(chosen).to_markdown(index=False), "",
        *embed(out, "reliability.png", f"Reliability diagrams on the test split (seed {seed}): accuracy against "
               "confidence per bin, before and after temperature scaling; dot area is the number of galaxies",
               lambda: plot_reliability(predictions, all_results[all_results["selected"]], seed)),
    ]


def consensus_counts(predictions: pd.DataFrame, consensus: pd.Series, seed: int) -> dict[str, list[tuple[int, int]]]:
    """Per method: (galaxies, right answers) in each consensus bin, then over every galaxy with a vote fraction."""
    counts = {}
    for method in present(predictions):
        picked = seed_predictions(predictions, method, seed)
        correct, _ = correct_and_confidence(picked)
        bins = consensus_bin(consensus.reindex(picked["GalaxyID"]).to_numpy(dtype=float))
        counts[method] = [(int(inside.sum()), int(correct[inside].sum()))
                          for inside in [*(bins == i for i in range(len(CONSENSUS_BINS))), bins >= 0]]
    return counts


def consensus_table(counts: dict[str, list[tuple[int, int]]]) -> pd.DataFrame:
    """One row per consensus bin (and all galaxies): galaxies in it, accuracy % [Wilson 95 % CI] per method."""
    rows = []
    for i, name in enumerate([*CONSENSUS_BINS, "all"]):
        row = {"vote consensus": name, "test galaxies": next(iter(counts.values()))[i][0]}
        for method, cells in counts.items():
            n, right = cells[i]
            row[f"{method} acc % [95 % CI]"] = \
                f"{right / n * 100:.1f} {fmt_interval(wilson_interval(right, n))}" if n else "–"
        rows.append(row)
    return pd.DataFrame(rows)


def calibration_table(chosen: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for method in present(chosen):
        runs = chosen[chosen["method"] == method]
        rows.append({"method": method, "temperature (fitted on val)": mean_and_sd(runs["temperature"]),
                     "test ECE % before": mean_and_sd(runs["test_ece"] * 100),
                     "test ECE % after": mean_and_sd(runs["test_ece_calibrated"] * 100),
                     "test NLL before": mean_and_sd(runs["test_nll"]),
                     "test NLL after": mean_and_sd(runs["test_nll_calibrated"])})
    return pd.DataFrame(rows)


def selective_table(first: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for method, run in first.loc[present(first.reset_index())].iterrows():
        row = {"method": method}
        for target in COVERAGE_TARGETS:
            share = run[f"coverage_at_{target * 100:.0f}"]
            row[f"taken at ≥ {target * 100:.0f} % accuracy"] = \
                f"{share * 100:.1f} % ({round(share * run['test_images'])} of {run['test_images']})"
        accuracy = run[f"accuracy_at_coverage_{REPORTED_COVERAGE * 100:.0f}"]
        row[f"acc % of the {REPORTED_COVERAGE * 100:.0f} % most confident"] = \
            "–" if np.isnan(accuracy) else f"{accuracy * 100:.1f}"
        rows.append(row)
    return pd.DataFrame(rows)


def frontier_lines(all_results: pd.DataFrame) -> list[str]:
    """What LoRA buys, in one sentence: its selected config's share of full's trainable parameters and the
    difference in test accuracy."""
    chosen = all_results[all_results["selected"]].groupby("method")
    params, accuracy = chosen["trainable_params"].first(), chosen["test_accuracy"].mean() * 100
    if not {"full", "lora"} <= set(params.index):
        return ["Both full fine-tuning and LoRA are needed to say what LoRA buys; this retrain lacks one.", ""]
    return [(f"**What LoRA buys:** its selected config trains {params['lora']:,} parameters, "
             f"{params['lora'] / params['full'] * 100:.2g} % of full fine-tuning's {params['full']:,}, for "
             f"{accuracy['lora'] - accuracy['full']:+.1f} percentage points of test accuracy against it "
             "(mean over seeds; selected configs)."), ""]


def selection_section(out: Path, all_results: pd.DataFrame, metric: Metric) -> list[str]:
    """The top-k retrain: each config's search val metric against its retrained val and test metric."""
    lines = ["## Top-k retrain: selection on validation data and the winner's curse", ""]
    search_column = f"search_{metric.name}"
    if "rank" not in all_results or search_column not in all_results:
        return lines + not_shown(out, "winners_curse.png", "this retrain predates top-k retrain (one config per "
                                 f"method): {RETRAIN_AGAIN}")
    trained = all_results[all_results["method"] != "direct"]
    if trained.empty:
        return lines + not_shown(out, "winners_curse.png", "only the direct baseline was tested: no config to choose")
    short, digits = ("acc %" if metric.percent else metric.task.metric_name), metric.digits
    difference = " (pp)" if metric.percent else ""
    rows = []
    for (method, rank), runs in sorted(trained.groupby(["method", "rank"]), key=lambda g: (
            METHOD_ORDER.index(g[0][0]), g[0][1])):
        search, val = metric.shown(runs[search_column].iloc[0]), metric.shown(runs[metric.name])
        gain = round(float(val.mean() - search), digits) + 0.0  # + 0.0: no "-0.00"
        rows.append({"method": method, "search rank": int(rank),
                     f"search val {short}": "–" if np.isnan(search) else f"{search:.{digits}f}",
                     f"retrained val {short}": mean_and_sd(val, digits),
                     f"retrained − search val{difference}": "–" if np.isnan(search) else f"{gain:+.{digits}f}",
                     f"test {short}": mean_and_sd(metric.shown(runs[f"test_{metric.task.metric}"]), digits),
                     "selected": "✓" if runs["selected"].any() else ""})
    better, name = ("best" if metric.task.mode == "max" else "lowest"), metric.task.metric_name
    return lines + [
        (f"Each method's top configs of its search were retrained with every seed; the config it reports "
         f"(✓) has the {better} mean **val** {name} over the seeds; no test number took part. The "
         f"search's val {name} is the {better} of many trials on the same val split, so it flatters its "
         f"winner (the winner's curse); the retrained val {name} is fresh training on the same "
         f"split, and the test {name} the only unbiased one. Retrained and test: mean ± sd over "
         "seeds. The direct baseline has no config to choose."),
        "", pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), "",
        *embed(out, "winners_curse.png", f"Each config's {name} as the search saw it, retrained on "
               "val, and on test; the thick line is the config selected on val",
               lambda: plot_winners_curse(trained, metric)),
    ]


def full_vs_lora(predictions: pd.DataFrame) -> list[str]:
    """Markdown lines: McNemar's exact test and a paired bootstrap of full fine-tuning vs LoRA on the same test
    images, per seed."""
    if not {"full", "lora"} <= set(predictions["method"]):
        return ["Not compared: the retrain did not train both full fine-tuning and LoRA.", ""]
    rows, significant, excludes_zero = [], 0, 0
    for seed, full, lora in paired_seeds(predictions):
        (full_right, _), (lora_right, _) = correct_and_confidence(full), correct_and_confidence(lora)
        only_full, only_lora, p = mcnemar_exact(full_right, lora_right)
        difference, (low, high) = paired_bootstrap(full_right, lora_right)
        significant += p < SIGNIFICANCE
        excludes_zero += low > 0 or high < 0
        rows.append({"seed": seed, "test images": len(full), "full − LoRA acc (pp)": f"{difference * 100:+.1f}",
                     "paired bootstrap 95 % CI (pp)": f"[{low * 100:+.1f}, {high * 100:+.1f}]",
                     "only full right": only_full, "only LoRA right": only_lora, "exact McNemar p": f"{p:.3g}",
                     f"significant at {SIGNIFICANCE:g}": "yes" if p < SIGNIFICANCE else "no"})
    if significant == len(rows):
        verdict = "significant in every seed"
    elif significant:
        verdict = f"significant in {significant} of {len(rows)} seeds only, so not a robust difference"
    else:
        verdict = "not significant in any seed: this test split cannot tell the two apart"
    return [
        ("McNemar's exact test pairs the two models' answers on the same test images and counts only the images "
         "where exactly one is right (predictions without TTA); under \"no difference\" each such image is a coin "
         f"flip. The paired bootstrap resamples the test images {BOOTSTRAP_RESAMPLES} times (fixed seed), scoring "
         "both models on each draw: its 95 % percentile interval is how far the accuracy difference could move on "
         "another test split of this size."),
        "",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True),
        "",
        (f"**Full fine-tuning vs LoRA: the difference is {verdict}** (two-sided, α = {SIGNIFICANCE:g}); the "
         f"bootstrap interval excludes 0 in {excludes_zero} of {len(rows)} seeds."),
        "",
    ]
