"""Reports: a real tiny search and a two-seed retrain give report.md files with readable figures and honest stats."""

import io
import json
import re
import shutil

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

from galaxy_tune.models.calibration import fit_temperature
from galaxy_tune.cli import main
from galaxy_tune.data.prepare import task_consensus
from galaxy_tune.data.kaggle import CSV_NAME
from galaxy_tune.report import write_report
from galaxy_tune.layout import EVALUATION
from galaxy_tune.report.evaluation import run_metrics
from galaxy_tune.report.figure import FigureSkipped
from galaxy_tune.report.figure import Metric
from galaxy_tune.data.tasks import get_task
from galaxy_tune.report.search_report import plot_param_importances, plot_val_curves

ACCURACY = Metric(get_task("seed-top2"))
from galaxy_tune.report.stats import (coverage_curve, fmt_interval, largest_coverage, mcnemar_exact,
                                      paired_bootstrap, t_interval, wilson_interval)

SEARCH_FIGURES = {"val_curves.png", "best_vs_trial.png", "best_vs_trial_epochs.png", "best_vs_time.png",
                  "param_slices.png"}
RETRAIN_FIGURES = {"test_accuracy.png", "winners_curse.png", "accuracy_by_consensus.png", "reliability.png",
                   "selective_prediction.png", "cost_accuracy_frontier.png", "confusion_matrices.png",
                   "misclassified.png"}
# What a retrain wrote before top-k selection, calibration and vote consensus.
NEW_RESULT_COLUMNS = ["rank", "selected", "search_val_accuracy", "temperature", "val_nll", "val_nll_calibrated"]
NEW_PREDICTION_COLUMNS = ["rank", "logit_0", "logit_1", "consensus"]


@pytest.fixture(scope="module")
def results(lora_search, tmp_path_factory):
    """A results folder with a 3-trial LoRA search and a 2-seed retrain of direct, full and LoRA."""
    results = tmp_path_factory.mktemp("results")
    shutil.copytree(lora_search, results / lora_search.name)
    assert main(["retrain", "--results-dir", str(results), "--seeds", "2", "--max-epochs", "2"]) == 0
    return results


def embedded_figures(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def table_row(report: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row that starts with `first_cell`."""
    line = next(line for line in report.splitlines() if line.startswith(f"| {first_cell} "))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def assert_readable_pngs(folder, names) -> None:
    for name in names:
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width >= 500 and image.height >= 300
            image.verify()


def test_search_report_embeds_its_figures_and_explains_the_missing_one(results):
    experiment = results / "search-lora"
    report = (experiment / "report.md").read_text()
    shown = embedded_figures(report)
    assert set(shown) == SEARCH_FIGURES == {p.name for p in experiment.glob("*.png")}
    assert_readable_pngs(experiment, shown)
    # Three trials are too few for Optuna's importances: the report says so instead of drawing noise.
    assert "importances (PED-ANOVA) over the trials that ran every epoch: not drawn: only" in report
    assert "run more --num-samples" in report
    assert "no `bench search` under this results folder ran the same problem" in report


def test_search_report_compares_with_random_search_when_bench_search_measured_the_problem(results, tmp_path):
    moved = tmp_path / "results" / "search-lora"
    shutil.copytree(results / "search-lora", moved)
    best = json.loads((moved / "best.json").read_text())
    curve = {"trial_epochs": [1, 2, 3], "mean": [0.5, 0.6, 0.6], "low": [0.4, 0.5, 0.55], "high": [0.6, 0.7, 0.65]}
    bench = tmp_path / "results" / "bench" / "search-20260101-000000"
    bench.mkdir(parents=True)
    for model, folder in (("tiny", bench), ("other", bench.with_name("search-20260102-000000"))):  # latest: other
        folder.mkdir(exist_ok=True)
        (folder / "search_bench.json").write_text(json.dumps({
            "settings": {"prepared": best["data"]["prepared"], "method": "lora", "model": model, "repeats": 3,
                         "max_epochs": best["config"]["epochs"], "experiments": str(folder)},
            "baseline": "random+fifo", "strategies": {"random+fifo": {"summary": {"curve": curve}}}}))
    report = write_report(moved).read_text()
    assert "best_vs_trial_epochs.png" in embedded_figures(report)
    assert f"random search's mean of 3 runs on the same problem, measured by `bench search` in {bench}" in report
    assert_readable_pngs(moved, ["best_vs_trial_epochs.png"])


def test_retrain_report_gives_intervals_tta_and_a_paired_test(results):
    retrain = next(results.glob("retrain-*"))
    report = (retrain / "report.md").read_text()
    shown = embedded_figures(report)
    assert set(shown) == RETRAIN_FIGURES
    assert_readable_pngs(retrain, shown)
    tested = pd.read_csv(retrain / "test_results.csv")
    for method in ("direct", "full", "lora"):
        runs = tested[tested["method"] == method]["test_accuracy"]
        assert fmt_interval(t_interval(runs)) in report  # the 95 % t-interval over the two seeds
    assert "95 % CI over test images" in report and "test acc % with TTA" in report
    assert "exact McNemar p" in report and "Full fine-tuning vs LoRA: the difference is" in report
    for column in ("trainable params", "train s per seed", "images seen per seed", "backbone weights"):
        assert column in report
    assert "random init tiny resnet" in report
    recipes = report.split("## Recipes")[1].split("Library versions")[0]  # each with the backbone it trained
    assert recipes.count('"model": "tiny"') == len(json.loads((retrain / "retrain.json").read_text())["recipes"])
    # Top-k: LoRA's 3 searched configs, each with its search val accuracy; the selection is the retrain's.
    assert "## Top-k retrain: selection on validation data and the winner's curse" in report
    selection = report.split("## Top-k retrain")[1].split("## ")[0]
    rows = [table_row(selection, method) for method in ("full", "lora")]
    assert [row[:2] for row in rows] == [["full", "1"], ["lora", "1"]]  # full: the reference recipe, no search
    assert rows[0][2] == "–" and float(rows[1][2]) == pytest.approx(  # the search val accuracy of LoRA's best
        json.loads((results / "search-lora" / "best.json").read_text())["val_accuracy"] * 100, abs=0.01)
    assert selection.count("| lora ") == tested.query("method == 'lora'")["rank"].nunique()
    assert selection.count("| ✓") == 2  # one selected config per trained method
    assert "paired bootstrap 95 % CI (pp)" in report and "What LoRA buys:" in report
    evaluation = pd.read_csv(retrain / EVALUATION)
    assert len(evaluation) == len(tested) and (evaluation["test_ece"] >= 0).all()
    assert evaluation[["method", "rank", "seed"]].equals(tested[["method", "rank", "seed"]])


def test_consensus_bins_come_from_the_csv_vote_fractions(results, demo_dir):
    retrain = next(results.glob("retrain-*"))
    report = (retrain / "report.md").read_text()
    data = json.loads((retrain / "retrain.json").read_text())["data"]
    splits = pd.read_csv(f"{data['prepared']}/splits.csv")
    test_ids = splits.loc[splits["split"] == "test", "GalaxyID"]
    votes = pd.read_csv(demo_dir / CSV_NAME).set_index("GalaxyID")
    consensus = task_consensus(votes, data["task"]).loc[test_ids]
    expected = {"< 0.5": (consensus < 0.5).sum(), "0.5–0.8": ((consensus >= 0.5) & (consensus < 0.8)).sum(),
                "≥ 0.8": (consensus >= 0.8).sum(), "all": len(test_ids)}
    for name, count in expected.items():
        assert table_row(report, name)[1] == str(count)
    # The per-run accuracy of a bin is that of the run's predictions on the galaxies in it.
    predictions = pd.read_csv(retrain / "test_predictions.csv").query("method == 'lora' and rank == 1 and seed == 0")
    confident = predictions["GalaxyID"].map(consensus) >= 0.8
    right = (predictions["prob_1"] > 0.5).astype(int) == predictions["label"]
    evaluation = pd.read_csv(retrain / EVALUATION).query("method == 'lora' and rank == 1 and seed == 0")
    assert evaluation["accuracy_consensus_from_0.8"].iloc[0] == pytest.approx(right[confident].mean())


def test_a_retrain_from_before_top_k_and_calibration_still_reports(results, tmp_path):
    retrain = next(results.glob("retrain-*"))
    old = tmp_path / "old"
    old.mkdir()
    tested = pd.read_csv(retrain / "test_results.csv")
    tested[tested["selected"]].drop(columns=NEW_RESULT_COLUMNS).to_csv(old / "test_results.csv", index=False)
    predictions = pd.read_csv(retrain / "test_predictions.csv")
    predictions[predictions["rank"] == 1].drop(columns=NEW_PREDICTION_COLUMNS).to_csv(
        old / "test_predictions.csv", index=False)
    info = json.loads((retrain / "retrain.json").read_text())
    for key in ("top_k", "selected_rank"):
        del info[key]
    (old / "retrain.json").write_text(json.dumps(info))
    report = write_report(old).read_text()
    assert "*Not shown: this retrain predates top-k retrain" in report
    assert "*Not shown: this retrain predates temperature scaling" in report
    assert {"winners_curse.png", "reliability.png"}.isdisjoint(embedded_figures(report))
    # Vote fractions are read again from the data folder's CSV; selective prediction and the frontier need
    # nothing new.
    assert {"accuracy_by_consensus.png", "selective_prediction.png", "cost_accuracy_frontier.png"} <= set(
        embedded_figures(report))
    assert "exact McNemar p" in report and "paired bootstrap 95 % CI (pp)" in report
    info["data"]["data_dir"] = str(tmp_path / "gone")
    (old / "retrain.json").write_text(json.dumps(info))
    report = write_report(old).read_text()
    assert "*Not shown: the retrain recorded no vote fractions and the Kaggle CSV is unreadable" in report
    assert not (old / "accuracy_by_consensus.png").exists()


def test_temperature_fitted_on_val_lowers_the_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)

    def overconfident(n):  # true P(class 1) = sigmoid(z), but the model says sigmoid(4 z)
        z = rng.normal(0, 1.5, n)
        labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
        return np.column_stack([np.zeros(n), 4 * z]), labels

    val_logits, val_labels = overconfident(2000)
    logits, labels = overconfident(2000)
    temperature = fit_temperature(val_logits, val_labels)
    assert temperature == pytest.approx(4, rel=0.2)
    results = pd.DataFrame({"method": ["lora"], "rank": [1], "seed": [0], "selected": [True],
                            "temperature": [temperature]})
    predictions = pd.DataFrame({"GalaxyID": np.arange(len(labels)), "label": labels, "method": "lora", "rank": 1,
                                "seed": 0, "logit_0": logits[:, 0], "logit_1": logits[:, 1],
                                "prob_1": 1 / (1 + np.exp(-logits[:, 1]))})
    run = run_metrics(results, predictions, consensus=None).iloc[0]
    assert run["test_ece_calibrated"] < run["test_ece"] / 2 and run["test_ece"] > 0.05
    assert run["test_nll_calibrated"] < run["test_nll"]


def test_paired_bootstrap_is_reproducible_and_contains_the_observed_difference():
    rng = np.random.default_rng(1)
    a, b = rng.random(300) < 0.85, rng.random(300) < 0.75
    difference, (low, high) = paired_bootstrap(a, b)
    assert difference == pytest.approx(a.mean() - b.mean())
    assert low < difference < high and paired_bootstrap(a, b) == (difference, (low, high))
    assert high - low == pytest.approx(2 * 1.96 * np.std(a * 1.0 - b) / np.sqrt(300), rel=0.15)  # ≈ normal theory
    assert paired_bootstrap(a, a) == (0.0, (0.0, 0.0))  # the same answers: no difference on any draw


def test_coverage_curve_keeps_ties_together():
    coverage, accuracy = coverage_curve(np.array([0.9, 0.8, 0.8, 0.6]), np.array([True, True, False, False]))
    assert coverage == pytest.approx([0.25, 0.75, 1.0]) and accuracy == pytest.approx([1.0, 2 / 3, 0.5])
    assert largest_coverage(coverage, accuracy, 0.95) == 0.25 and largest_coverage(coverage, accuracy, 0.6) == 0.75
    assert largest_coverage(coverage, accuracy, 0.5) == 1.0 and largest_coverage(coverage, accuracy[::-1] * 0, 0.5) == 0


def test_report_command_rebuilds_every_report_from_disk(results, capsys):
    figures = list(results.glob("*/*.png"))
    for stale in [*figures, *results.glob("*/report.md")]:
        stale.unlink()
    assert main(["report", "--results-dir", str(results)]) == 0
    assert capsys.readouterr().out.count("wrote ") == 2
    assert all(path.is_file() for path in figures)


def test_gallery_falls_back_to_the_pixel_cache_and_skips_without_pixels(results, tmp_path):
    retrain = next(results.glob("retrain-*"))
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("test_results.csv", "test_predictions.csv", "retrain.json"):
        shutil.copy(retrain / name, moved)
    info = json.loads((moved / "retrain.json").read_text())
    info["data"]["data_dir"] = str(tmp_path / "gone")  # the JPEGs are gone; the pixel cache is still there
    (moved / "retrain.json").write_text(json.dumps(info))
    assert "misclassified.png" in embedded_figures(write_report(moved).read_text())
    assert_readable_pngs(moved, ["misclassified.png"])
    info["data"]["prepared"] = str(tmp_path / "gone")
    (moved / "retrain.json").write_text(json.dumps(info))
    report = write_report(moved).read_text()
    assert "misclassified.png" not in embedded_figures(report) and "not drawn" in report
    assert not (moved / "misclassified.png").exists()


def test_importances_are_drawn_once_enough_trials_completed():
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    optimizer = optuna.distributions.CategoricalDistribution(["adam", "sgd"])
    study = optuna.create_study(direction="maximize")
    for i in range(8):
        params = {"lr": 10 ** (-4 + i / 4), "optimizer": ["adam", "sgd"][i % 2]}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={"lr": lr, "optimizer": optimizer},
                                                  value=0.5 + i / 20))
    assert len(plot_param_importances(study, "toy", ACCURACY).axes[0].patches) == 2
    one = optuna.create_study(direction="maximize")
    one.add_trial(study.trials[0])
    with pytest.raises(FigureSkipped, match="only 1 trial"):
        plot_param_importances(one, "toy", ACCURACY)


def test_trials_with_the_same_curve_are_drawn_once_and_counted():
    curves = {"best": ("COMPLETED", [0.7, 0.8]), "twin": ("COMPLETED", [0.7, 0.8]), "a": ("STOPPED", [0.5]),
              "b": ("STOPPED", [0.5]), "c": ("STOPPED", [0.5]), "d": ("COMPLETED", [0.6, 0.65])}
    trials = pd.DataFrame([{"trial_id": trial, "status": status, "val_accuracy_curve": json.dumps(curve),
                            "best_val_accuracy": max(curve)} for trial, (status, curve) in curves.items()])
    figure = plot_val_curves(trials, None, "toy", ACCURACY)
    [ax] = figure.axes
    drawn = [line.get_ydata().tolist() for line in ax.get_lines()]
    assert drawn == [[50], [50], [60, 65], [70, 80]]  # in %: stopped once (line and ×), the other, the best
    assert [text.get_text() for text in ax.texts] == ["3 trials"]
    assert "best trial best (+1 with its curve)" in [text.get_text() for text in figure.legends[0].get_texts()]
    [ax] = plot_val_curves(trials, ("majority class", 0.5), "toy", ACCURACY).axes  # a trial flat on the baseline
    *drawn, baseline = ax.get_lines()
    assert baseline.get_linestyle() == ":" and baseline.get_zorder() < min(line.get_zorder() for line in drawn)


def test_interval_and_test_statistics_match_textbook_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert t_interval([0.8, 0.9]) == pytest.approx((0.85 - 0.6353, 0.85 + 0.6353), abs=1e-4)
    assert t_interval([0.8]) is None and fmt_interval(None) == "needs ≥ 2 seeds"
    assert fmt_interval((0.5, 1.2)) == "[50.0, 100.0]"  # accuracy cannot pass 100 %
    a = np.array([True] * 10 + [False] * 5)
    assert mcnemar_exact(a, np.ones(15, dtype=bool)) == (0, 5, pytest.approx(0.0625))  # 2 * 0.5**5
    assert mcnemar_exact(a, a)[2] == 1.0


def test_consensus_figure_draws_bins_every_method_got_all_right_or_all_wrong():
    from galaxy_tune.report.evaluation_figures import plot_consensus

    figure = plot_consensus({"full": [(10, 10), (10, 0), (0, 0)], "lora": [(10, 9), (10, 10), (0, 0)]},
                            ("< 0.5", "0.5-0.8", ">= 0.8"), seed=0)
    figure.savefig(io.BytesIO(), format="png")  # Wilson bounds at 0 % / 100 % must not make negative whiskers
