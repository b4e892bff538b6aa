"""`search --storage`: Ray's results in object storage, against a real S3 server (moto's) started here on 127.0.0.1
and stopped by its PID."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
from pyarrow import fs

from conftest import TINY_SEARCH, free_port
from galaxy_tune.cli import main
from galaxy_tune.storage import object_storage

BUCKET = "results"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "galaxy", "AWS_SECRET_ACCESS_KEY": "tune", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3(log, **env) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port of 127.0.0.1, once it answers; and its host:port."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            return server, f"127.0.0.1:{port}"
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto's server did not start"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server with the bucket `results`, and the credentials in this process's environment (as a user sets
    them; Ray hands them to the trials)."""
    import boto3

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    with open(tmp_path_factory.mktemp("s3") / "moto.log", "w") as log:
        server, endpoint = start_s3(log)
    try:
        boto3.client("s3", endpoint_url=f"http://{endpoint}").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def uri_of(endpoint: str, bucket: str = BUCKET) -> str:
    return f"s3://{bucket}/galaxy-tune?endpoint_override={endpoint}&scheme=http"


def test_a_search_keeps_rays_results_in_the_bucket_and_a_working_copy_here(ray_local, demo_dir, s3, tmp_path):
    uri, local = uri_of(s3), tmp_path / "local"
    argv = ["search", "lora", "--results-dir", str(local), "--name", "stored", "--storage", uri]
    assert main([*argv, "--data-dir", str(demo_dir), "--num-samples", "3", "--checkpoint-every", "0", *TINY_SEARCH,
                 "--max-epochs", "3"]) == 0
    storage, experiment = object_storage(uri), local / "stored"
    root = storage.path("stored")
    stored = {i.path.removeprefix(root + "/") for i in storage.filesystem.get_file_info(fs.FileSelector(root,
                                                                                                       recursive=True))
              if i.type == fs.FileType.File}
    # Ray's: its state, and each trial's reports and checkpoints, pruned to its best and latest.
    assert any(p.startswith("experiment_state-") for p in stored) and "tuner.pkl" in stored
    trials = pd.read_csv(experiment / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 3
    for trial, epochs in zip(trials["trial_id"], trials["epochs"]):
        assert f"trial_{trial}/result.json" in stored
        kept = {p.split("/")[1] for p in stored if p.startswith(f"trial_{trial}/checkpoint_")}
        assert 1 <= len(kept) <= 2 and f"checkpoint_{epochs - 1:06d}" in kept, (trial, epochs, kept)
        # The working copy: the trial's reports, not its checkpoints.
        assert len((experiment / f"trial_{trial}" / "result.json").read_text().splitlines()) == epochs
    assert (trials["epochs"] == 3).any() and not list(experiment.glob("trial_*/checkpoint_*"))
    # galaxy_tune's own files, uploaded beside Ray's as they are here.
    for name in ("search.json", "trials.csv", "best.json", "optuna.db", "report.md", "val_curves.png",
                 "best_vs_time.png"):
        with storage.filesystem.open_input_stream(f"{root}/{name}") as uploaded:
            assert uploaded.read() == (experiment / name).read_bytes(), name
    assert json.loads((experiment / "search.json").read_text())["storage"] == uri
    assert "not drawn: no result.json" not in (experiment / "report.md").read_text()  # read in the working copy
    # --resume finds Ray's state in the bucket: the search had ended, so it runs no trial and keeps every one.
    assert main([*argv[:-2], "--resume"]) == 0
    resumed = pd.read_csv(experiment / "trials.csv", dtype={"trial_id": str})
    pd.testing.assert_frame_equal(*(t.sort_values("trial_id", ignore_index=True) for t in (resumed, trials)))


def refused_in_one_line(argv: list[str], results, capsys) -> str:
    assert main([*argv, "--results-dir", str(results)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert not results.exists() or list(results.iterdir()) == []  # nothing prepared, no experiment left
    return error


def test_storage_that_cannot_be_used_is_refused_before_anything_starts(demo_dir, s3, tmp_path, capsys):
    search = ["search", "lora", "--data-dir", str(demo_dir), "--name", "refused", *TINY_SEARCH]
    results = tmp_path / "results"
    error = refused_in_one_line([*search, "--storage", uri_of(s3, "missing")], results, capsys)
    assert "the bucket missing does not exist: create it (e.g. `aws s3 mb s3://missing`)" in error
    closed = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    error = refused_in_one_line([*search, "--storage", uri_of(closed)], results, capsys)
    assert f"nothing answers at {closed} within 3 s" in error and time.monotonic() - started < 10
    error = refused_in_one_line([*search, "--storage", f"s3://galaxy:tune@{BUCKET}/x"], results, capsys)
    assert "give the credentials in the environment (AWS_ACCESS_KEY_ID" in error and "tune@" not in error
    error = refused_in_one_line([*search, "--storage", "nosuch://bucket/x"], results, capsys)
    assert "--storage nosuch://bucket/x: " in error and "give a URI such as s3://bucket/prefix" in error
    assert main([*search, "--storage", uri_of(s3), "--results-dir", f"s3://{BUCKET}/elsewhere"]) == 2
    assert "is not a local folder: with --storage" in capsys.readouterr().err


def test_credentials_the_server_refuses_are_refused_naming_the_variables(tmp_path, s3):
    """A server that checks credentials (moto's, with authentication on), given ones it does not know."""
    with open(tmp_path / "moto.log", "w") as log:
        server, endpoint = start_s3(log, INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        with pytest.raises(Exception, match="the credentials were refused .*set AWS_ACCESS_KEY_ID and "
                                            "AWS_SECRET_ACCESS_KEY"):
            object_storage(uri_of(endpoint))
    finally:
        server.kill()
        server.wait()
