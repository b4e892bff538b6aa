"""Reports: a real tiny search and a two-seed retrain give report.md files with readable figures and honest stats."""

import json
import re
import shutil

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image

from conftest import CROP_PX, IMAGE_SIZE_PX
from galaxy_tune.cli import main
from galaxy_tune.report import write_report
from galaxy_tune.report.figure import FigureSkipped
from galaxy_tune.report.search_report import plot_param_importances
from galaxy_tune.report.stats import fmt_interval, mcnemar_exact, t_interval, wilson_interval

SEARCH = ["--image-size", str(IMAGE_SIZE_PX), "--crop", str(CROP_PX), "--model", "tiny", "--max-epochs", "2"]
SEARCH_FIGURES = {"val_curves.png", "best_vs_trial.png", "best_vs_time.png", "param_slices.png"}
RETRAIN_FIGURES = {"test_accuracy.png", "confusion_matrices.png", "misclassified.png"}


@pytest.fixture(scope="module")
def results(ray_local, demo_dir, tmp_path_factory):
    """A results folder with a 3-trial LoRA search and a 2-seed retrain of direct, full and LoRA."""
    results = tmp_path_factory.mktemp("results")
    assert main(["search", "lora", "--data-dir", str(demo_dir), "--results-dir", str(results), "--name",
                 "search-lora", "--num-samples", "3", *SEARCH]) == 0
    assert main(["retrain", "--results-dir", str(results), "--seeds", "2", "--max-epochs", "2"]) == 0
    return results


def embedded_figures(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


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
    assert len(plot_param_importances(study, "toy").axes[0].patches) == 2
    one = optuna.create_study(direction="maximize")
    one.add_trial(study.trials[0])
    with pytest.raises(FigureSkipped, match="only 1 trial"):
        plot_param_importances(one, "toy")


def test_interval_and_test_statistics_match_textbook_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert t_interval([0.8, 0.9]) == pytest.approx((0.85 - 0.6353, 0.85 + 0.6353), abs=1e-4)
    assert t_interval([0.8]) is None and fmt_interval(None) == "needs ≥ 2 seeds"
    assert fmt_interval((0.5, 1.2)) == "[50.0, 100.0]"  # accuracy cannot pass 100 %
    a = np.array([True] * 10 + [False] * 5)
    assert mcnemar_exact(a, np.ones(15, dtype=bool)) == (0, 5, pytest.approx(0.0625))  # 2 * 0.5**5
    assert mcnemar_exact(a, a)[2] == 1.0
