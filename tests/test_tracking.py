"""MLflow tracking against a real `mlflow server`: a search whose server dies half-way, and the refusals. The runs
of a search resumed after kill -9 are checked in test_faults, a retrain's in test_search_and_retrain."""

import json
import re
import sys

import pandas as pd
from mlflow import MlflowClient

from galaxy_tune.cli import main


def test_a_search_whose_mlflow_server_dies_completes_and_says_so(watched_search):
    out, err, uri, experiment = (watched_search.out, watched_search.err, watched_search.mlflow_uri,
                                 watched_search.experiment)
    assert f"MLflow: this search's runs are at {uri}/#/experiments/" in out
    # Said once, however many updates it missed; and at the end, with the command that catches MLflow up.
    assert err.count(f"MLflow at {uri} does not answer") == 1, err
    assert re.search(rf"MLflow at {uri} does not answer \((connection refused|connection lost)\)", err), err
    assert re.search(rf"MLflow at {uri} did not take the end of the search \((connection refused|connection lost)\)",
                     err), err
    assert f"`search lora --resume --name dies --results-dir {experiment.parent}` brings its runs up to date" in err
    assert len(pd.read_csv(experiment / "trials.csv")) == 4
    assert json.loads((experiment / "best.json").read_text())["complete"] is True
    assert (experiment / "report.md").is_file()


def test_a_server_failure_is_said_by_its_cause():
    from mlflow.exceptions import MlflowException
    from urllib3.exceptions import ProtocolError

    from galaxy_tune.tracking import describe

    def failed(cause: Exception) -> MlflowException:  # as MLflow's REST client words a request that failed
        return MlflowException(f"API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with "
                               f"exception {cause!r}")

    broken = ProtocolError("Connection broken: IncompleteRead(0 bytes read, 2 more expected)")
    assert describe(failed(broken)) == "connection lost"
    assert describe(failed(ConnectionResetError(104, "Connection reset by peer"))) == "connection lost"
    assert describe(failed(ConnectionRefusedError(111, "Connection refused"))) == "connection refused"
    assert describe(ValueError("first line\nsecond")) == "ValueError: first line"


def test_a_writer_that_outlasts_the_flush_stops_before_the_search_ends(mlflow_server, monkeypatch, capsys):
    """The end of the search waits for MLflow's writer to stop, so `finish_search` never writes beside it."""
    from ray.tune.experiment import Trial

    from galaxy_tune.data.tasks import get_task
    from galaxy_tune.search import tracking

    monkeypatch.setattr(tracking, "FLUSH_S", 0.0)  # a server slower than the flush: here, any server
    task = get_task("seed-top2")
    callback = tracking.MlflowTrials(mlflow_server, "outlasted", "outlasted-1", {"method": "lora"}, task)
    callback.setup()
    trials = [Trial("train_trial", config={"lr": 0.01}, stub=True, trial_id=f"t{i}") for i in range(20)]
    for trial in trials:
        callback.on_trial_result(0, trials, trial, {"epoch": 1, task.val_metric: 0.5, "val_loss": 0.7})
    callback.on_experiment_end(trials)
    assert not callback.thread.is_alive()
    assert "did not take the last updates of" in capsys.readouterr().err


def test_mlflow_refusals_are_one_line_before_anything_runs(lora_search, mlflow_server, demo_dir, tmp_path, monkeypatch,
                                                           capsys):
    # An MLflow experiment of the search's name that was deleted would take no run.
    client = MlflowClient(mlflow_server)
    client.delete_experiment(client.create_experiment("gone"))
    assert main(["search", "lora", "--data-dir", str(demo_dir), "--results-dir", str(tmp_path), "--name", "gone",
                 "--mlflow", mlflow_server]) == 2
    assert "the MLflow experiment 'gone' at http://127.0.0.1:" in capsys.readouterr().err
    assert main(["retrain", "--results-dir", str(tmp_path), "--name", "gone", "--mlflow", mlflow_server]) == 2
    assert "is deleted: restore it (`mlflow experiments restore --experiment-id" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["search", "lora", "--results-dir", str(tmp_path), "--mlflow"]) == 2
    assert "--mlflow without a URI takes MLFLOW_TRACKING_URI, which is not set" in capsys.readouterr().err
    # A resumed search logs where it began; `--mlflow` alone takes MLFLOW_TRACKING_URI.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert main(["search", "lora", "--resume", "--name", lora_search.name, "--results-dir", str(lora_search.parent),
                 "--mlflow"]) == 2
    assert "logs to MLflow at no server (no --mlflow), not sqlite:///elsewhere.db: a resumed search keeps the runs " \
        "where they began" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if MLflow were not installed
    assert main(["retrain", "--results-dir", str(tmp_path), "--mlflow", "http://127.0.0.1:1"]) == 2
    assert 'pip install "galaxy_tune[mlflow]"' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing made
