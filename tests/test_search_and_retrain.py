"""End to end through the CLI, with real Ray Tune, Optuna and a tiny ResNet: search lora, search full, retrain."""

import contextlib
import io
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from ray import tune
from PIL import Image
from transformers import AutoImageProcessor, ResNetForImageClassification

from conftest import IMAGE_SIZE_PX, SEARCH
from galaxy_tune.cli import main
from galaxy_tune import tracking
from galaxy_tune.tracking import log_retrain
from galaxy_tune.data.prepare import load_prepared
from galaxy_tune.data.loader import open_split
from galaxy_tune.data.tasks import get_task
from galaxy_tune.train import pick_device, place, predict_logits



@pytest.fixture(scope="module")
def searched(lora_search, demo_dir):
    """A results folder holding a finished lora search (3 trials) and full search (1 trial) of the same data."""
    results = lora_search.parent
    assert main(["search", "full", "--data-dir", str(demo_dir), "--results-dir", str(results), "--name",
                 "search-full", "--num-samples", "1", *SEARCH]) == 0
    return results


@pytest.mark.parametrize("method, samples", [("lora", 3), ("full", 1)])
def test_search_writes_trials_best_and_a_readable_optuna_study(searched, method, samples):
    experiment = searched / f"search-{method}"
    trials = pd.read_csv(experiment / "trials.csv")
    assert len(trials) == samples
    assert set(trials["status"]) <= {"COMPLETED", "STOPPED"}
    assert trials["epochs"].between(1, 2).all()
    best = json.loads((experiment / "best.json").read_text())
    assert best["method"] == method and best["config"]["method"] == method
    assert best["val_accuracy"] == pytest.approx(trials["best_val_accuracy"].max(), abs=1e-6)
    assert best["model"] == "tiny" and best["data"]["task"] == "seed-top2"
    assert set(best["config"]) >= {"lr", "weight_decay", "optimizer", "scheduler", "epochs", "batch_size"}
    # The first trial is the reference recipe (points_to_evaluate).
    first = json.loads(trials.iloc[0]["config"])
    assert (first["lr"], first["scheduler"]) == ((1e-3, "step") if method == "lora" else (1e-4, "cosine"))
    # The study opens with Optuna's own API, one trial per Ray trial, searched params recorded.
    study = optuna.load_study(study_name=f"search-{method}", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert len(study.trials) == samples
    assert {"lr", "scheduler"} <= set(study.trials[0].params)
    assert study.best_value == pytest.approx(best["val_accuracy"], abs=1e-6)
    # Ray Tune's own API reads the experiment back.
    restored = tune.Tuner.restore(str(experiment), trainable="train_trial").get_results()
    assert len(restored) == samples
    # Tiny trials end long before a checkpoint is due (60 s): only the trials that reached the last epoch
    # wrote one, at that epoch; those ASHA stopped wrote none.
    for result in restored:
        assert (result.checkpoint is not None) == (result.metrics["epoch"] == 2)


def test_a_second_search_with_the_same_name_is_refused(searched, demo_dir, capsys):
    argv = ["search", "lora", "--data-dir", str(demo_dir), "--results-dir", str(searched), "--name",
            "search-lora", *SEARCH]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("flags, culprit", [
    (["--gpus-per-trial", "1"], "has no GPU"),
    (["--cpus-per-trial", "64"], "largest node has 2 CPU"),
])
def test_impossible_resources_fail_before_any_trial(ray_local, demo_dir, tmp_path, capsys, flags, culprit):
    argv = ["search", "full", "--data-dir", str(demo_dir), "--results-dir", str(tmp_path / "results"), *SEARCH,
            *flags]
    assert main(argv) == 2
    assert culprit in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no experiment folder left behind


@pytest.mark.parametrize("param, culprit", [
    ("lr: {type: loguniform, low: 1.0e-2, high: 1.0e-4}", "'lr' has low 0.01 > high 0.0001"),
    ("label_smoothing: 1.5", "'label_smoothing' is fixed to a value training refuses"),  # TrainConfig's own rule
])
def test_broken_space_file_fails_before_ray_starts(demo_dir, tmp_path, capsys, param, culprit):
    space = tmp_path / "space.yaml"
    space.write_text(f"params:\n  {param}\n")
    argv = ["search", "lora", "--data-dir", str(demo_dir), "--results-dir", str(tmp_path / "results"), "--space",
            str(space), "--num-samples", "1", *SEARCH]
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert culprit in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()  # refused before anything was prepared, no experiment folder left


@pytest.fixture(scope="module")
def retrained(searched, mlflow_server) -> tuple[Path, str]:
    """The retrain of both searches with default settings, logged to MLflow: its folder and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["retrain", "--results-dir", str(searched), "--top-k", "2", "--mlflow", mlflow_server]) == 0
    return max(searched.glob("retrain-*")), printed.getvalue()


def test_retrain_reports_all_three_methods_and_exports_usable_models(retrained):
    out, printed = retrained
    results = pd.read_csv(out / "test_results.csv")
    # 3 seeds by default, of each search's 2 best configs; each method reports the config it picked on val.
    # The full search ran 1 trial: its one config is retrained, and the console and the report say so.
    assert results.groupby("method").size().to_dict() == {"direct": 3, "full": 3, "lora": 6}
    assert results[results["selected"]].groupby("method").size().to_dict() == {"direct": 3, "full": 3, "lora": 3}
    assert set(results["rank"]) == {1, 2} and (results["temperature"] > 0).all()
    shortfall = f"full: --top-k 2, but {out.parent / 'search-full'} has 1 distinct finished config(s): 1 retrained"
    assert shortfall in printed and f"Note: {shortfall}." in (out / "report.md").read_text()
    assert "lora: --top-k" not in printed
    assert (results["val_nll_calibrated"] <= results["val_nll"] + 1e-9).all()  # fitted on val: never worse there
    results = results[(results["seed"] == 0) & (results["rank"] == 1)]
    assert {"method", "seed", "config", "val_accuracy", "test_accuracy", "trainable_params", "epochs",
            "model"} <= set(results.columns)
    assert results["test_accuracy"].between(0, 1).all()
    assert results.set_index("method")["trainable_params"]["lora"] < results.set_index("method")[
        "trainable_params"]["full"]
    report = (out / "report.md").read_text()
    for method, reference in (("direct", "68.94"), ("full", "88.52"), ("lora", "73.93")):
        assert method in report and reference in report and method in printed
    # The LoRA model, merged and saved in Hugging Face format, loads with plain transformers and predicts the
    # test accuracy the retrain reported.
    info = json.loads((out / "retrain.json").read_text())["data"]
    test = open_split(load_prepared(info["prepared"], info["image_size_px"], info["crop_px"]), "test")
    device = pick_device()  # where the retrain ran: the CPU here, CUDA on a GPU machine
    for method in ("full", "lora"):
        model = place(ResNetForImageClassification.from_pretrained(out / f"{method}-seed0" / "hf"), device)
        accuracy = (predict_logits(model, test, device).argmax(1) == test.labels).mean()
        one_galaxy = 1 / len(test) if device.type == "cuda" else 1e-6  # bf16 kernels may differ between runs
        assert accuracy == pytest.approx(results.set_index("method")["test_accuracy"][method], abs=one_galaxy)
    # The val-fitted temperature is folded into the exported head: a plain transformers load gives the
    # calibrated logits, the retrain's test logits divided by the temperature (on the CPU, to float rounding).
    if device.type == "cpu":
        temperature = results.set_index("method")["temperature"]["lora"]
        saved = pd.read_csv(out / "test_predictions.csv").query("method == 'lora' and seed == 0 and rank == 1")
        model = ResNetForImageClassification.from_pretrained(out / "lora-seed0" / "hf")
        exported = predict_logits(model, test, device)
        expected = saved.set_index("GalaxyID").loc[test.galaxy_ids, ["logit_0", "logit_1"]].to_numpy() / temperature
        assert exported == pytest.approx(expected, abs=1e-4)
    # The image processor saved beside it prepares a raw Kaggle JPEG the way training did.
    processor = AutoImageProcessor.from_pretrained(out / "lora-seed0" / "hf")
    galaxy = Image.open(Path(info["data_dir"]) / "images_training_rev1" / f"{test.galaxy_ids[0]}.jpg")
    assert processor(galaxy, return_tensors="pt")["pixel_values"].shape == (1, 3, IMAGE_SIZE_PX, IMAGE_SIZE_PX)
    assert (out / "lora-seed0" / "adapters.safetensors").stat().st_size < (out / "full-seed0" / "hf" /
                                                                           "model.safetensors").stat().st_size


def test_a_stopped_retrain_continues_without_running_its_finished_runs_again(searched, retrained, capsys):
    argv = ["retrain", "--results-dir", str(searched), "--top-k", "2", "--name", "requeued", "--resume", "auto"]
    runs = searched / "requeued" / "runs"

    def stop_after_two_runs():
        deadline = time.time() + 120
        while len(list(runs.glob("*.json"))) < 2 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends before it requeues the job

    stopper = threading.Thread(target=stop_after_two_runs, daemon=True)
    stopper.start()
    assert main(argv) == 75
    stopper.join()
    assert "`--name requeued --resume auto`" in capsys.readouterr().err
    kept = {path.name: path.stat().st_mtime_ns for path in runs.glob("*.json")}
    assert 2 <= len(kept) < 12
    assert main([*argv, "--seeds", "2"]) == 2  # the plan it started with, or nothing
    assert "was started with other --seeds: 3 then, 2 now" in capsys.readouterr().err
    assert main(argv) == 0
    assert f"{len(kept)} of 12 runs finished before" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in runs.glob("*.json") if path.name in kept} == kept
    uninterrupted, resumed = (pd.read_csv(out / "test_results.csv").drop(columns="train_seconds")
                              for out in (retrained[0], searched / "requeued"))
    if pick_device().type == "cpu":  # training is bitwise reproducible on the CPU only
        pd.testing.assert_frame_equal(resumed, uninterrupted)
    else:
        assert resumed[["method", "rank", "seed", "config"]].equals(uninterrupted[["method", "rank", "seed", "config"]])


def test_retrain_from_an_unfinished_experiment_is_refused(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "search.json").write_text("{}")
    assert main(["retrain", "--results-dir", str(tmp_path), "--from", str(tmp_path / "half")]) == 2
    assert "no finished trial" in capsys.readouterr().err


def test_predict_a_folder_of_jpegs_with_a_retrained_model(retrained, demo_dir, tmp_path):
    model = retrained[0] / "lora-seed0" / "hf"
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(model), "--images", str(demo_dir / "images_training_rev1"),
                 "--out", str(out), "--tta"]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["GalaxyID", "Class6.2", "Class1.2"]
    assert len(table) == 120
    assert (table[["Class6.2", "Class1.2"]].sum(axis=1) - 1).abs().max() < 1e-5


def test_top_k_retrain_picks_each_methods_config_on_val_accuracy_alone():
    results = pd.DataFrame({
        "method": ["lora"] * 4, "rank": [1, 1, 2, 2], "seed": [0, 1, 0, 1],
        "val_accuracy": [0.80, 0.82, 0.85, 0.84],  # rank 2 is better on val...
        "test_accuracy": [0.95, 0.95, 0.70, 0.70]})  # ...and worse on test: test must not sway the pick
    assert get_task("seed-top2").chosen_configs(results).tolist() == [False, False, True, True]
    # kaggle-votes: the lower val RMSE wins.
    rmse = results.rename(columns={"val_accuracy": "val_rmse", "test_accuracy": "test_rmse"})
    assert get_task("kaggle-votes").chosen_configs(rmse).tolist() == [True, True, False, False]


def test_a_retrain_logs_a_parent_and_a_run_per_method_config_and_seed_to_mlflow(retrained, mlflow_server, tmp_path,
                                                                                 monkeypatch, capsys):
    out, printed = retrained
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(out.name)
    [parent] = client.search_runs([experiment.experiment_id], "tags.`galaxy_tune.role` = 'retrain'")
    assert parent.data.tags["galaxy_tune.retrain_id"] == json.loads((out / "plan.json").read_text())["id"]
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"report.md", "test_results.csv"}
    results = pd.read_csv(out / "test_results.csv")
    evaluation = pd.read_csv(out / "test_evaluation.csv").set_index(["method", "rank", "seed"])
    runs = {r.data.tags["galaxy_tune.run"]: r for r in client.search_runs(
        [experiment.experiment_id], "tags.`galaxy_tune.role` = 'retrain_run'")}
    assert len(runs) == len(results)
    for row in results.itertuples():
        run = runs[f"{row.method if row.rank == 1 else f'{row.method}-top{row.rank}'}-seed{row.seed}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["galaxy_tune.selected"] == str(row.selected).lower()
        metrics = run.data.metrics
        assert metrics["test_accuracy"] == pytest.approx(row.test_accuracy)
        assert metrics["test_accuracy_tta"] == pytest.approx(row.test_accuracy_tta)
        assert metrics["test_ece"] == pytest.approx(evaluation.loc[(row.method, row.rank, row.seed), "test_ece"])
        assert run.data.params["method"] == row.method and int(run.data.params["seed"]) == row.seed
        model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
        assert ("model/config.json" in model) == (row.method != "direct")  # the tiny exports are uploaded
    # Logged again (a resumed retrain): nothing is added.
    log_retrain(mlflow_server, out)
    assert len(client.search_runs([experiment.experiment_id])) == len(results) + 1
    # Models over the size limit are recorded by path, and the console says so.
    monkeypatch.setattr(tracking, "MODEL_ARTIFACT_MAX_MB", 0)
    big = shutil.copytree(out, tmp_path / "retrain-big")
    log_retrain(mlflow_server, big)
    assert f"MLflow: {len(results[results['method'] != 'direct'])} exported model(s) over 0 MB recorded by path" in \
        capsys.readouterr().out
    run = client.search_runs([client.get_experiment_by_name("retrain-big").experiment_id],
                             "tags.`galaxy_tune.run` = 'lora-seed0'")[0]
    assert run.data.tags["galaxy_tune.model_path"] == str(big / "lora-seed0" / "hf")
    assert not client.list_artifacts(run.info.run_id, "model")
    assert f"MLflow: the retrain's runs are at {mlflow_server}/#/experiments/" in printed
