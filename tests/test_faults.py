"""Faults: a crashing trial resumes from its checkpoint; a killed search resumes; a search stopped by a signal
continues when the same command runs again."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
from mlflow import MlflowClient
from ray import tune

from conftest import (CROP_PX, IMAGE_SIZE_PX, epochs_logged, kill_driver, mlflow_search, start_search,
                      start_search_args, wait_for)
from galaxy_tune.cli import main
from galaxy_tune.search.faults import RAY_STATE, STOP_MARKER, KeepReportsOnRetry
from galaxy_tune.search.trainable import train_trial
from galaxy_tune.train import TrainConfig

# A tiny trial takes a few tenths of a second, and the kill lands 1-2 s after the first ends: 15 of 16 trials had
# ended by then here, and 12 or 13 of 40. 40 leave trials to run on a faster machine too.
SAMPLES = 40
STOPPED_SAMPLES = 16  # stopped three times, each once one more trial has finished: trials to spare


# The trial of each case, run in one Tuner: one that never fails (what a resumed trial must reproduce), and two
# that crash in epoch 2, with a checkpoint every epoch (the retry starts at epoch 2 from the epoch-1 checkpoint) or
# none due before the last epoch (the retry starts over).
CASES = {"steady": {}, "every_epoch": {"fail_at_epoch": 2, "checkpoint_every_s": 0},
         "never_due": {"fail_at_epoch": 2, "checkpoint_every_s": 3600}}


def case_trial(config: dict, **kwargs) -> None:
    """`train_trial` with the fault-injection arguments of the config's case."""
    train_trial({k: v for k, v in config.items() if k != "case"}, **kwargs, **CASES[config["case"]])


class StaleExperimentCopy(tune.Callback):
    """Leaves the every_epoch trial's result files in the experiment folder as Ray's periodic copy can leave them
    when its first run fails: from before its epoch-1 report. A retry from a checkpoint reads them back."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.config["case"] == "every_epoch" and result["epoch"] == 1 and not trial.run_metadata.num_failures:
            folder = Path(trial.storage.trial_fs_path)
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("result.json", "progress.csv"):
                (folder / name).write_text("")


@pytest.fixture(scope="module")
def cases(ray_local, prepared, tmp_path_factory) -> dict[str, tune.Result]:
    """Case -> the result of its trial, the three run at once as a search runs them (half a CPU each), with the
    search's callback that keeps a retried trial's reports."""
    config = TrainConfig(method="full", lr=3e-3, optimizer="adam", scheduler="onecycle", epochs=3,
                         batch_size=16).to_dict()
    trainable = tune.with_parameters(case_trial, prepared_dir=str(prepared.folder), image_size_px=IMAGE_SIZE_PX,
                                     crop_px=CROP_PX, model_name="tiny", cpus=1, gpus=0)
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 0.5}),
                       param_space={**config, "case": tune.grid_search(list(CASES))},
                       run_config=tune.RunConfig(name="cases", storage_path=str(tmp_path_factory.mktemp("cases")),
                                                 failure_config=tune.FailureConfig(max_failures=1),
                                                 callbacks=[StaleExperimentCopy(), KeepReportsOnRetry()]))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TUNE_GLOBAL_CHECKPOINT_S", "3600")  # no copy of the experiment folder between run and retry
            return {result.config["case"]: result for result in tuner.fit()}
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.parametrize("case, epochs_run", [("every_epoch", [1, 2, 3]), ("never_due", [1, 1, 2, 3])])
def test_a_trial_that_crashes_in_epoch_2_resumes_from_its_latest_checkpoint(cases, case, epochs_run):
    crashed = cases[case]
    assert crashed.error is None
    assert "injected failure in epoch 2" in (Path(crashed.path) / "error.txt").read_text()
    history = crashed.metrics_dataframe
    assert history["epoch"].tolist() == epochs_run
    assert crashed.checkpoint is not None  # the last epoch always leaves one
    history = history.drop_duplicates("epoch", keep="last")  # the epochs the finished run is made of
    expected = cases["steady"].metrics_dataframe
    assert not (Path(cases["steady"].path) / "error.txt").exists()
    for column in ("train_loss", "val_loss", "val_accuracy"):
        assert history[column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-5)


def live_statuses(experiment) -> set[str]:
    """The trial statuses in the trials.csv a running search keeps up to date (replaced atomically)."""
    table = experiment / "trials.csv"
    return set(pd.read_csv(table)["status"]) if table.is_file() else set()


def finished_trials(experiment, epochs):
    """Trial folders whose result.json holds every epoch."""
    done = {}
    for result in experiment.glob("trial_*/result.json"):
        lines = result.read_text().splitlines()
        if len(lines) >= epochs:
            done[result.parent.name] = len(lines)
    return done


def completed_with_every_epoch(experiment) -> set[str]:
    """The trial folders that the live trials.csv calls COMPLETED and whose result.json holds their 3 epochs."""
    table = experiment / "trials.csv"
    if not table.is_file():
        return set()
    rows = pd.read_csv(table)
    completed = {f"trial_{t}" for t, status in zip(rows["trial_id"], rows["status"]) if status == "COMPLETED"}
    return completed & set(finished_trials(experiment, 3))


def test_a_search_killed_with_sigkill_resumes_without_losing_or_repeating_trials(ray_local, demo_dir, tmp_path,
                                                                                  mlflow_server):
    experiment = tmp_path / "killed"
    # Ray saves its experiment state, and copies its trials' result.json files, into the experiment folder every
    # second (by default every 10 s or more): the kill lands soon after the first trial ends, on a busy machine too.
    driver = start_search(ray_local, "lora", "killed", demo_dir, tmp_path, SAMPLES,
                          ray_env={"TUNE_GLOBAL_CHECKPOINT_S": "1"},
                          extra=("--mlflow", mlflow_server), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # A trial is finished for a resume once Ray has saved an experiment state that records its end. The live
        # trials.csv is rewritten after Ray records an end.
        wait_for(lambda: completed_with_every_epoch(experiment), 240,
                 "a trial completed in the live trials.csv, with every epoch in its result.json", driver)
        recorded = time.time()
        ended = completed_with_every_epoch(experiment)
        wait_for(lambda: any(state.stat().st_mtime > recorded for state in experiment.glob("experiment_state-*.json")),
                 120, "an experiment state saved after that", driver)
        # Between two of Ray's copies of its state into the folder: a kill during one cuts a file short, which
        # --resume refuses (the test below).
        wait_for(lambda: time.time() - max(p.stat().st_mtime for pattern in RAY_STATE for p in experiment.glob(pattern))
                 > 0.3, 60, "a moment without a state copy", driver)
    finally:
        kill_driver(driver)
    before = {trial: epochs for trial, epochs in finished_trials(experiment, 3).items() if trial in ended}
    assert set(before) == ended
    # The default strategy is the one resumed: multivariate TPE with constant liar (2 trials at once) and ASHA.
    searched = json.loads((experiment / "search.json").read_text())
    assert (searched["sampler"], searched["scheduler"], searched["concurrency"], searched["constant_liar"]) == (
        "tpe", "asha", 2, True)
    assert searched["gpus_per_trial"] == 0
    if (experiment / "best.json").exists():  # the live one: the search had not ended
        live = json.loads((experiment / "best.json").read_text())
        assert live["complete"] is False, "the search ended before the kill"
    # The live study survived the kill readable, with the finished trials' epochs in it.
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{experiment / 'optuna.db'}")
    mirrored = {f"trial_{t.user_attrs['ray_trial_id']}": t for t in study.trials}
    for trial, epochs in before.items():
        assert len(mirrored[trial].intermediate_values) == epochs

    assert main(["search", "lora", "--resume", "--name", "killed", "--results-dir", str(tmp_path)]) == 0
    trials = pd.read_csv(experiment / "trials.csv")
    assert len(trials) == SAMPLES and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"COMPLETED", "STOPPED"}
    assert set(trials["node_id"]) == {ray_local.get_runtime_context().get_node_id()}  # all on the test's Ray
    after = {f"trial_{t}": n for t, n in zip(trials["trial_id"], trials["epochs"])}
    for trial, epochs in before.items():  # finished before the kill: kept, and not run again
        assert after[trial] == epochs
        assert len((experiment / trial / "result.json").read_text().splitlines()) == epochs
    best = json.loads((experiment / "best.json").read_text())
    assert best["method"] == "lora" and best["running"] is False and best["complete"] is True
    # The study holds each trial Ray ran exactly once (none lost, none repeated), as trials.csv has it.
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{experiment / 'optuna.db'}")
    ray_ids = [t.user_attrs["ray_trial_id"] for t in study.trials]
    assert len(ray_ids) == SAMPLES and sorted(ray_ids) == sorted(trials["trial_id"])
    states = {t.user_attrs["ray_trial_id"]: (t.state.name, len(t.intermediate_values)) for t in study.trials}
    assert states == {t: ({"COMPLETED": "COMPLETE", "STOPPED": "PRUNED"}[s], n)
                      for t, s, n in zip(trials["trial_id"], trials["status"], trials["epochs"])}
    # MLflow, logged by both drivers: one parent, finished with the report, and one run per trial Ray ran, with
    # each of its epochs once and its final state (a trial the killed driver started but Ray lost is deleted).
    parents, children = mlflow_search(mlflow_server, experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["best_val_accuracy"] == pytest.approx(best["val_accuracy"])
    client = MlflowClient(mlflow_server)
    history = [m.value for m in client.get_metric_history(parents[0].info.run_id, "best_val_accuracy")]
    assert history == sorted(history)  # logged as it improved
    assert "report.md" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert sorted(children) == sorted(trials["trial_id"]) and all(len(runs) == 1 for runs in children.values())
    for trial, status, epochs in zip(trials["trial_id"], trials["status"], trials["epochs"]):
        [run] = children[trial]
        assert run.data.tags["galaxy_tune.state"] == status.lower() and run.info.status == (
            "FINISHED" if status == "COMPLETED" else "KILLED")
        for metric in ("val_accuracy", "val_loss", "train_loss"):
            assert epochs_logged(mlflow_server, run, metric) == list(range(1, epochs + 1)), (trial, metric)


def reports(experiment, trial: str) -> list[str]:
    """A trial's result.json, a line per report: a trial that restarted without a checkpoint has more than epochs."""
    return (experiment / f"trial_{trial}" / "result.json").read_text().splitlines()


def stop_once_more_finished(experiment, *signums: int) -> threading.Thread:
    """A thread that sends this process each of `signums`, one right after the other, once the live trials.csv has
    one more finished trial."""
    def finished() -> int:
        table = experiment / "trials.csv"
        return int((pd.read_csv(table)["status"] != "UNFINISHED").sum()) if table.is_file() else 0

    def stop():
        before, deadline = finished(), time.time() + 240
        while finished() <= before and time.time() < deadline:
            time.sleep(0.2)
        for signum in signums:
            os.kill(os.getpid(), signum)

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread


def finished_reports(experiment) -> dict[str, tuple[int, list[str]]]:
    """trial -> (epochs, its reports), of each trial the live trials.csv calls finished."""
    trials = pd.read_csv(experiment / "trials.csv")
    finished = trials[trials["status"] != "UNFINISHED"]
    return {trial: (epochs, reports(experiment, trial)) for trial, epochs in zip(finished["trial_id"], finished["epochs"])}


def test_a_requeued_search_stopped_by_sigterm_sigusr1_and_ctrl_c_completes_with_nothing_lost_or_repeated(
        ray_local, demo_dir, tmp_path, capsys):
    """What a Slurm job with --requeue does: the same command, `--resume auto`, stopped by a signal, then run again."""
    experiment = tmp_path / "requeued"
    driver = start_search(ray_local, "full", "requeued", demo_dir, tmp_path, STOPPED_SAMPLES, resume_auto=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The live trials.csv is rewritten once Ray has recorded a trial's end (its checkpoint, written with the
        # last report, can appear before that: a stop in between leaves that trial unfinished).
        wait_for(lambda: "COMPLETED" in live_statuses(experiment), 240, "a completed trial in the live trials.csv",
                 driver)
        driver.send_signal(signal.SIGTERM)  # what Slurm sends at preemption or the time limit
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 75, err
    assert "SIGTERM: each running trial checkpoints at the end of its epoch" in err
    assert "the same command and --resume auto" in err
    best = json.loads((experiment / "best.json").read_text())  # the best so far, of a search not ended
    assert best["running"] is False and best["complete"] is False
    # A trial stopped mid-search checkpointed with its last epoch (without the stop, only its last epoch would).
    stopped = pd.read_csv(experiment / "trials.csv").query("status == 'UNFINISHED' and epochs > 0")["trial_id"]
    assert all("checkpoint_dir_name" in json.loads(reports(experiment, trial)[-1]) for trial in stopped)
    assert not (experiment / STOP_MARKER).exists()
    kept = finished_reports(experiment)  # of each trial finished when a run of the command stopped
    assert kept
    # Run again in this process, as the requeued job would: SIGUSR1 (Slurm's --signal=B:USR1), and Ctrl-C during
    # its grace, which stops at once.
    stopper = stop_once_more_finished(experiment, signal.SIGUSR1, signal.SIGINT)
    assert main(["search", "full", *start_search_args(demo_dir, tmp_path, "requeued", STOPPED_SAMPLES),
                 "--resume", "auto"]) == 75
    stopper.join()
    err = capsys.readouterr().err
    assert "SIGUSR1: each running trial checkpoints at the end of its epoch" in err
    assert "stopped: the search stopped after" in err
    assert not (experiment / STOP_MARKER).exists()
    finished = finished_reports(experiment)
    assert len(finished) > len(kept)
    kept |= {trial: done for trial, done in finished.items() if trial not in kept}
    # The same name with another setting is refused, naming it.
    assert main(["search", "full", *start_search_args(demo_dir, tmp_path, "requeued", STOPPED_SAMPLES),
                 "--max-epochs", "2", "--resume", "auto"]) == 2
    assert "was started with --max-epochs 3, this command has 2" in capsys.readouterr().err
    assert main(["search", "full", *start_search_args(demo_dir, tmp_path, "requeued", STOPPED_SAMPLES),
                 "--resume", "auto"]) == 0
    trials = pd.read_csv(experiment / "trials.csv")
    assert len(trials) == STOPPED_SAMPLES and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"COMPLETED", "STOPPED"}
    after = dict(zip(trials["trial_id"], trials["epochs"]))
    for trial, (epochs, lines) in kept.items():  # finished before a stop: kept, and not run again
        assert after[trial] == epochs
        assert reports(experiment, trial) == lines
    assert json.loads((experiment / "best.json").read_text())["complete"] is True
    study = optuna.load_study(study_name="requeued", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == sorted(trials["trial_id"])


def test_resume_of_a_search_whose_ray_state_a_kill_cut_short_is_refused(lora_search, tmp_path, capsys):
    experiment = shutil.copytree(lora_search, tmp_path / "cut")
    newest = max(experiment.glob("search_gen_state-*.json"))
    newest.write_bytes(newest.read_bytes()[:10])  # Ray would start the search over
    assert main(["search", "lora", "--resume", "--name", "cut", "--results-dir", str(tmp_path)]) == 2
    assert f"{newest} is cut short" in capsys.readouterr().err
    assert len(list(experiment.glob("trial_*"))) == 3


def test_resume_of_a_search_that_does_not_exist(tmp_path, capsys):
    assert main(["search", "lora", "--resume", "--name", "nothing", "--results-dir", str(tmp_path)]) == 2
    assert "no search to resume" in capsys.readouterr().err
    assert main(["search", "lora", "--resume", "auto", "--results-dir", str(tmp_path)]) == 2
    assert "--resume auto needs the --name" in capsys.readouterr().err
