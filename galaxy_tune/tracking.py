"""MLflow tracking: where a search's and a retrain's runs go when `--mlflow URI` is given.

One MLflow experiment per search or retrain name. A parent run stands for the search (or the retrain), and a
nested child run for each trial (or each retrained method, config rank and seed). Runs are found again by their
tags, so a resumed search or retrain adds to its runs instead of repeating them:

- `galaxy_tune.role`: `search`, `trial`, `retrain` or `retrain_run`;
- `galaxy_tune.ray_trial_id` on a trial's run, `galaxy_tune.run` on a retrain's (`lora-top2-seed1`);
- `galaxy_tune.state` on a trial's run when it ends: `completed`, `stopped` (early, by the scheduler) or `failed`.

MLflow is optional (`pip install "galaxy_tune[mlflow]"`); this module imports it only when a URI is given. A
tracking server that is down must never stop the work it records: requests are not retried by MLflow here
(galaxy_tune retries them itself) and time out after 10 s, unless the MLFLOW_HTTP_REQUEST_* variables say
otherwise. MLflow's own "View run" lines are turned off (MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path

from . import layout
from .errors import GalaxyTuneError

ROLE = "galaxy_tune.role"
TRIAL = "galaxy_tune.ray_trial_id"
RUN = "galaxy_tune.run"
SEARCH_ID = "galaxy_tune.search_id"  # on a search's parent run; search.json keeps it as mlflow_search_id
RETRAIN_ID = "galaxy_tune.retrain_id"  # on a retrain's parent run; plan.json keeps it as id
STATE = "galaxy_tune.state"
PARENT = "mlflow.parentRunId"  # MLflow's own tag of a nested run
CHECK_WAIT_S = 3.0  # how long a search or retrain waits, before it starts, for MLflow to say its experiment is usable
MODEL_ARTIFACT_MAX_MB = 25  # larger exported models are recorded by path (tag galaxy_tune.model_path)
REQUEST_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def resolve_uri(given: str | None) -> str | None:
    """The tracking URI of `--mlflow URI`; `--mlflow` alone ("") takes MLFLOW_TRACKING_URI. Refused at once when
    MLflow is not installed."""
    if given is None:
        return None
    uri = given or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise GalaxyTuneError("--mlflow without a URI takes MLFLOW_TRACKING_URI, which is not set: give the "
                              "server, e.g. --mlflow http://127.0.0.1:5000, or a file, --mlflow sqlite:///mlflow.db")
    if importlib.util.find_spec("mlflow") is None:  # found, not imported: the run imports it when it logs
        raise GalaxyTuneError('--mlflow needs MLflow, which is not installed: pip install "galaxy_tune[mlflow]"')
    return uri


def check_experiment(uri: str | None, name: str, wait_s: float = CHECK_WAIT_S) -> None:
    """Before a search or retrain starts: refuse a deleted MLflow experiment of its name, which would take no run.
    A server that does not answer within `wait_s` is left to the run itself, which goes on without it."""
    if not uri:
        return
    refused = []

    def check():
        try:
            Tracking(uri, name)
        except GalaxyTuneError as err:
            refused.append(err)
        except Exception:  # the server does not answer: said by the run that logs to it
            pass

    checking = threading.Thread(target=check, name="galaxy_tune-mlflow-check", daemon=True)
    checking.start()
    checking.join(wait_s)
    if refused:
        raise refused[0]


def describe(err: Exception) -> str:
    """An MLflow error in one line: a refused connection's text is pages long, its cause at the end."""
    text = str(err)
    for cause, said in (("Connection refused", "connection refused"), ("Connection aborted", "connection lost"),
                        ("Connection broken", "connection lost"), ("Connection reset", "connection lost"),
                        ("RemoteDisconnected", "connection lost"), ("timed out", "timed out"),
                        ("Name or service not known", "unknown host"), ("Max retries exceeded", "no answer")):
        if cause in text:
            return said
    lines = text.strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


class Tracking:
    """A connection to one MLflow experiment, and the runs in it found by their tags."""

    def __init__(self, uri: str, experiment: str):
        for name, value in REQUEST_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient

        self.uri, self.client = uri, MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found and found.lifecycle_stage == "deleted":
            raise GalaxyTuneError(f"the MLflow experiment {experiment!r} at {uri} is deleted: restore it (`mlflow "
                                  f"experiments restore --experiment-id {found.experiment_id}`), or choose another "
                                  "--name")
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def find(self, tags: dict[str, str]) -> list:
        """Every run of the experiment with these tags, page by page."""
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1000,
                                           page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def parent(self, name: str, tags: dict[str, str], params: dict) -> str:
        """The id of the run with these tags, made with `params` when there is none."""
        found = self.find(tags)
        if found:
            return found[0].info.run_id
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self.log_params(run_id, params)
        return run_id

    def child(self, parent: str, role: str, name: str, tags: dict, params: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={ROLE: role, PARENT: parent, **tags})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        self.log_steps(run_id, [(key, value, step) for key, value in values.items()])

    def log_steps(self, run_id: str, rows: list[tuple[str, float, int]]) -> None:
        """Metrics as (key, value, step) rows, in batches MLflow takes (at most 1000 a batch)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), stamp, step) for key, value, step in rows]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])

    def url(self) -> str:
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}" if self.uri.startswith("http") \
            else f"{self.uri} (experiment {self.experiment_id})"


def log_retrain(uri: str, out_dir: Path) -> None:
    """A finished retrain in MLflow: a parent run with the plan and the report, a child run per (method, config
    rank, seed) with its test and val metrics, test ECE, temperature and exported model. Runs logged before (a
    resumed retrain) are kept, not repeated."""
    import pandas as pd

    try:
        tracking = Tracking(uri, out_dir.name)
        retrained = json.loads((out_dir / layout.RETRAIN).read_text())
        # A retrain of galaxy_tune 0.2.0 has no id in its plan: its name alone finds it.
        retrain_id = json.loads((out_dir / layout.RETRAIN_PLAN).read_text()).get("id")
        tags = {ROLE: "retrain", **({RETRAIN_ID: retrain_id} if retrain_id else {})}
        parent = tracking.parent(out_dir.name, tags, {
            "model": retrained["model"], "seeds": retrained["seeds"], "methods": " ".join(retrained["methods"]),
            "top_k": retrained["top_k"], "metric": retrained["metric"], "data": retrained["data"].get("prepared")})
        done = {run.data.tags.get(RUN) for run in tracking.find({ROLE: "retrain_run", PARENT: parent})}
        results = pd.read_csv(out_dir / layout.TEST_RESULTS)
        evaluation = out_dir / layout.EVALUATION
        ece = pd.read_csv(evaluation).set_index(["method", "rank", "seed"]) if evaluation.is_file() else None
        by_path = []
        for row in results.to_dict("records"):
            name = f"{layout.run_folder(row['method'], int(row['rank']))}-seed{row['seed']}"
            if name in done:
                continue
            metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k.startswith(("test_", "val_", "temperature")) and v == v}
            if ece is not None and (row["method"], row["rank"], row["seed"]) in ece.index:
                found = ece.loc[(row["method"], row["rank"], row["seed"])]
                metrics |= {k: float(found[k]) for k in ("test_ece", "test_ece_calibrated") if k in found}
            params = {"method": row["method"], "rank": row["rank"], "seed": row["seed"], "source": row["source"],
                      **json.loads(row["config"] or "{}")}
            run = tracking.child(parent, "retrain_run", name, {RUN: name, "galaxy_tune.selected": str(
                bool(row["selected"])).lower()}, params)
            tracking.log_metrics(run, metrics)
            model = out_dir / name / layout.HF_FOLDER
            if model.is_dir():
                size_mb = sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 2**20
                if size_mb <= MODEL_ARTIFACT_MAX_MB:
                    tracking.client.log_artifacts(run, str(model), artifact_path="model")
                else:
                    tracking.client.set_tag(run, "galaxy_tune.model_path", str(model.resolve()))
                    by_path.append(name)
            tracking.client.set_terminated(run, "FINISHED")
        for path in (out_dir / layout.REPORT, out_dir / layout.TEST_RESULTS):
            tracking.client.log_artifact(parent, str(path))
        tracking.client.set_terminated(parent, "FINISHED")
        if by_path:
            print(f"MLflow: {len(by_path)} exported model(s) over {MODEL_ARTIFACT_MAX_MB} MB recorded by path "
                  "(tag galaxy_tune.model_path), not uploaded")
        print(f"MLflow: the retrain's runs are at {tracking.url()}")
    except Exception as err:
        print(f"galaxy_tune: MLflow at {uri} did not take the retrain ({describe(err)}); its files in {out_dir} are "
              f"complete, and `retrain --name {out_dir.name} --resume auto --mlflow {uri}` with the same settings "
              "logs it once the server answers", file=sys.stderr)
