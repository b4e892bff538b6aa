"""The tasks: the decision-tree mapping of kaggle-votes checked on real Galaxy Zoo rows, its loss, metric and
baseline, and the end-to-end kaggle-votes run a Kaggle user makes: search -> retrain -> predict -> submission."""

import importlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from galaxy_tune import cli
from galaxy_tune.cli import main
from galaxy_tune.data.prepare import read_votes, split_manifest
from galaxy_tune.models.backbone import build_model
from galaxy_tune.data.kaggle import CLASS_COLUMNS, PARENT_ANSWER, question_columns
from galaxy_tune.data.tasks import TASKS, get_task, per_question_softmax

FIXTURES = Path(__file__).parent / "fixtures"
VOTES = get_task("kaggle-votes")


def real_fractions() -> pd.DataFrame:
    return pd.read_csv(FIXTURES / "galaxyzoo_real_rows.csv").set_index("GalaxyID")[CLASS_COLUMNS]


def tree_errors(fractions: pd.DataFrame) -> dict[int, float]:
    """Per question, the largest |sum of its answers - the fraction that reached it| over the rows."""
    return {q: float((fractions[question_columns(q)].sum(axis=1) - (1.0 if parent is None else fractions[parent]))
                     .abs().max()) for q, parent in PARENT_ANSWER.items()}


def test_the_parent_answers_are_the_decision_tree_of_the_real_data():
    # Ten real rows (ties and zeros among them): every question's answers sum to its parent's fraction.
    assert max(tree_errors(real_fractions()).values()) < 1e-6


def test_per_question_softmax_gives_tree_consistent_fractions_and_can_reproduce_real_rows():
    logits = torch.randn(64, 37, dtype=torch.float64) * 3
    out = pd.DataFrame(per_question_softmax(logits).numpy(), columns=CLASS_COLUMNS)
    assert max(tree_errors(out).values()) < 1e-12 and (out.to_numpy() >= 0).all()

    # Logits log(answer / parent) give back the real fractions (so the mapping can fit any real row).
    real = real_fractions()
    shares = np.concatenate([real[question_columns(q)].to_numpy() / np.maximum(
        1.0 if parent is None else real[[parent]].to_numpy(), 1e-12) for q, parent in PARENT_ANSWER.items()], axis=1)
    fitted = per_question_softmax(torch.from_numpy(np.log(np.clip(shares, 1e-12, None))))
    assert np.abs(fitted.numpy() - real.to_numpy()).max() < 1e-6


def test_the_vote_loss_is_the_squared_metric_and_trains_every_output():
    logits = torch.randn(8, 37, requires_grad=True)
    targets = torch.from_numpy(real_fractions().to_numpy(np.float32)[:8])
    loss = VOTES.loss(logits, targets)
    assert loss.item() == pytest.approx(VOTES.score(logits.detach().numpy(), targets.numpy()) ** 2, rel=1e-5)
    loss.backward()
    assert (logits.grad.abs().sum(0) > 0).all()


def test_a_fresh_kaggle_votes_head_starts_at_the_constant_predictor():
    train = real_fractions().to_numpy()
    bias = VOTES.head_bias(train)
    assert np.abs(per_question_softmax(torch.from_numpy(bias)[None])[0].numpy() - train.mean(0)).max() < 1e-5
    model = build_model("tiny", num_labels=37, head_bias=bias)
    assert torch.equal(model.classifier[-1].bias, torch.from_numpy(bias).float())
    assert get_task("seed-top2").head_bias(np.array([0, 1, 1])) is None  # binary heads keep their zero bias


def test_baselines_and_directions():
    train = np.zeros((2, 37))
    train[1] = 1.0  # the training mean is 0.5 everywhere
    test = np.zeros((3, 37))
    test[0, :] = 0.5  # predicted exactly; the other two rows are 0.5 off in every output
    assert VOTES.baseline(train, test) == pytest.approx(np.sqrt(2 / 3 * 0.25))
    assert (VOTES.val_metric, VOTES.mode, VOTES.direction) == ("val_rmse", "min", "minimize")
    binary = get_task("seed-top2")
    assert (binary.val_metric, binary.mode) == ("val_accuracy", "max")
    assert binary.baseline(np.array([0, 0, 1]), np.array([0, 1, 1, 1])) == 0.25
    assert VOTES.better(0.1, 0.2) and binary.better(0.9, 0.8)


def test_the_cli_offers_every_task():
    assert cli.TASK_NAMES == tuple(TASKS)


def test_rmse_searches_stop_and_keep_checkpoints_by_the_lowest_value(tmp_path):
    search = importlib.import_module("galaxy_tune.search.run")
    strategy = importlib.import_module("galaxy_tune.search.strategy")
    for name in ("asha", "hyperband"):
        scheduler = strategy.make_scheduler(name, 4, VOTES)
        assert (scheduler.metric, scheduler._mode) == ("val_rmse", "min")
    trial = tmp_path / "trial_x"
    for epoch, value in enumerate((0.30, 0.12, 0.20, 0.25), start=1):
        (trial / f"checkpoint_{epoch:06d}").mkdir(parents=True)
        with open(trial / "result.json", "a") as out:
            out.write(json.dumps({"epoch": epoch, "val_rmse": value, "checkpoint_dir_name": f"checkpoint_{epoch:06d}"})
                      + "\n")
    search.prune_checkpoints(trial, VOTES)
    assert sorted(p.name for p in trial.glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000004"]


def test_a_rare_answer_does_not_stop_a_kaggle_votes_split_with_small_held_out_fractions():
    strata = pd.Series([0] * 600 + [1] * 385 + [2] * 15, index=np.arange(1000) + 100_000)
    manifest = split_manifest(strata, seed=0, val_fraction=0.05, test_fraction=0.05, every_class=False)
    assert manifest["split"].value_counts().to_dict() == {"train": 900, "val": 50, "test": 50}


def test_kaggle_votes_search_retrain_predict_writes_a_submission(ray_local, demo_dir, tmp_path):
    assert max(tree_errors(read_votes(demo_dir)[CLASS_COLUMNS]).values()) < 1e-6  # the demo votes obey the tree
    results = tmp_path / "results"
    common = ["--image-size", "32", "--crop", "256", "--model", "tiny"]
    assert main(["search", "full", "--task", "kaggle-votes", "--data-dir", str(demo_dir), "--results-dir",
                 str(results), "--name", "votes", "--num-samples", "2", "--max-epochs", "2", *common]) == 0
    experiment = results / "votes"
    best = json.loads((experiment / "best.json").read_text())
    trials = pd.read_csv(experiment / "trials.csv")
    assert (best["metric"], best["mode"]) == ("val_rmse", "min")
    assert {json.loads(c)["label_smoothing"] for c in trials["config"]} == {0.0}  # meaningless here: not searched
    assert best["val_rmse"] == trials["best_val_rmse"].min() > 0
    for curve, value in zip(trials["val_rmse_curve"], trials["best_val_rmse"]):
        assert min(json.loads(curve)) == value  # the best of a trial is its lowest RMSE
    import optuna

    study = optuna.load_study(study_name="votes", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert not any("label_smoothing" in t.params for t in study.trials)
    assert "validation RMSE" in (experiment / "report.md").read_text()

    assert main(["retrain", "--results-dir", str(results), "--methods", "direct", "full", "--seeds", "1",
                 "--top-k", "1"]) == 0
    [retrain] = results.glob("retrain-*")
    tested = pd.read_csv(retrain / "test_results.csv")
    info = json.loads((retrain / "retrain.json").read_text())
    assert {"test_rmse", "test_rmse_tta", "val_rmse"} <= set(tested.columns)
    report = (retrain / "report.md").read_text()
    assert info["baseline_test_rmse"] > 0 and "## Test RMSE (37 vote fractions" in report
    assert "| Class11 (6 answers) | Class4.1" in report  # the per-question table, from the prepared split
    selection = report.split("## Top-k retrain")[1].split("## ")[0]  # the winner's curse, in RMSE
    assert "search val RMSE" in selection and "lowest mean **val** RMSE" in selection
    assert "![" in selection and (retrain / "winners_curse.png").is_file()

    # predict on the test galaxies (as on Kaggle's images_test_rev1) gives the retrain's own outputs.
    predictions = pd.read_csv(retrain / "test_predictions.csv")
    predictions = predictions[predictions["method"] == "full"].set_index("GalaxyID")
    images = tmp_path / "images_test_rev1"
    images.mkdir()
    for galaxy in predictions.index:
        (images / f"{galaxy}.jpg").symlink_to(demo_dir / "images_training_rev1" / f"{galaxy}.jpg")
    submission = tmp_path / "submission.csv"
    assert main(["predict", "--model", str(retrain / "full-seed0" / "hf"), "--images", str(images), "--tta",
                 "--out", str(submission)]) == 0
    table = pd.read_csv(submission)
    assert list(table.columns) == ["GalaxyID", *CLASS_COLUMNS] and len(table) == len(predictions)
    assert max(tree_errors(table[CLASS_COLUMNS]).values()) < 1e-6
    expected = predictions.loc[table["GalaxyID"], [f"pred_{c}" for c in CLASS_COLUMNS]].to_numpy()
    assert np.abs(table[CLASS_COLUMNS].to_numpy() - expected).max() < 1e-4
