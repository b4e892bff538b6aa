"""`search --storage`: Ray's results and the prepared data in object storage, against a real S3 server (moto's, the
session's `s3_server`)."""

import json
import os
import pickle
import shutil
import socketserver
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pandas as pd
import pytest
from pyarrow import fs

from conftest import (BUCKET, TINY_SEARCH, S3Server, free_port, kill_driver, s3_requests, s3_uri, start_s3,
                      start_search, wait_for)
from galaxy_tune.cli import main
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.search.faults import RAY_STATE, STOP_MARKER, StopMark, newest_ray_state
from galaxy_tune.search.uploads import RETRY_AFTER_S, UploadViews
from galaxy_tune.storage import Storage, object_storage, sub_uri

# The kill lands about a second after the first trial ends (Ray's state is uploaded every second): 4 or 5 of 16
# trials had started by then here, so a faster machine has trials left to run too. Each costs about 1.5 s of the test.
KILLED_SAMPLES = 16


def stored_trials(storage, name: str) -> list[dict]:
    """The trials of Ray's experiment state in the bucket (an object is whole once seen)."""
    saved = newest_ray_state(storage.filesystem, storage.path(name), RAY_STATE[:1])
    return [json.loads(trial) for trial, _ in json.loads(saved[RAY_STATE[0]][1])["trial_data"]] if saved else []


def stored_files(storage, name: str) -> set[str]:
    root = storage.path(name)
    return {i.path.removeprefix(root + "/") for i in storage.filesystem.get_file_info(fs.FileSelector(
        root, recursive=True)) if i.type == fs.FileType.File}


def stored_table(storage, name: str) -> pd.DataFrame | None:
    try:
        with storage.filesystem.open_input_stream(storage.path(name, "trials.csv")) as source:
            return pd.read_csv(source, dtype={"trial_id": str})
    except FileNotFoundError:
        return None


def test_a_search_killed_on_one_machine_continues_retrains_reports_and_predicts_on_others_from_the_bucket_alone(
        ray_local, demo_dir, s3_server, tmp_path, monkeypatch):
    """Each command runs from an empty --results-dir of its own, as on another machine; the driver's data is
    never given again after the first start."""
    uri = s3_uri(s3_server.endpoint, prefix="elsewhere")
    storage, node_cache = object_storage(uri), Path(os.environ["GALAXY_TUNE_CACHE"])
    shutil.rmtree(node_cache / "prepared", ignore_errors=True)  # another test's search may have fetched the data
    # Ray copies its experiment state to the bucket every second here (by default every 10 s or more).
    driver = start_search(ray_local, "lora", "killed", demo_dir, tmp_path / "first", KILLED_SAMPLES,
                          ray_env={"TUNE_GLOBAL_CHECKPOINT_S": "1"},
                          extra=("--storage", uri, "--checkpoint-every", "0"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The searcher's state as Ray first copied it to the bucket: put back after the kill, it is what a kill
        # during a later copy leaves when the trials' state was copied and the searcher's not yet.
        searcher = storage.filesystem, storage.path("killed"), RAY_STATE[1:]
        wait_for(lambda: len(newest_ray_state(*searcher)) == 2, 240, "the searcher's state in the bucket", driver)
        stale = newest_ray_state(*searcher)
        # The bucket's trials.csv is uploaded as each trial ends. The kill lands once Ray's state there has
        # recorded that end, and holds more trials than the stale searcher knows.
        wait_for(lambda: (t := stored_table(storage, "killed")) is not None and (t["status"] == "COMPLETED").any(),
                 240, "a completed trial in the bucket's trials.csv", driver)
        ended, known = stored_table(storage, "killed"), pickle.loads(stale[RAY_STATE[1]][1])["counter"]

        def recorded() -> bool:
            trials = stored_trials(storage, "killed")
            done = {trial["trial_id"] for trial in trials if trial["status"] == "TERMINATED"}
            return len(trials) > known and set(ended.loc[ended["status"] == "COMPLETED", "trial_id"]) <= done

        wait_for(recorded, 120, "Ray's state in the bucket recording those trials' end", driver)
    finally:
        kill_driver(driver)
    before = dict(zip(ended.loc[ended["status"] == "COMPLETED", "trial_id"],
                      ended.loc[ended["status"] == "COMPLETED", "epochs"]))
    with storage.filesystem.open_input_stream(storage.path("killed", "search.json")) as searched:
        shared = json.loads(searched.read())["shared"]
    assert len(before) < KILLED_SAMPLES  # the kill left trials to run
    for path, data in stale.values():
        with storage.filesystem.open_output_stream(path) as out:
            out.write(data)
    manifest = f"elsewhere/shared/{shared}/manifest.json"
    assert s3_requests(s3_server, "GET", manifest) == 1  # the node's trials fetched the data once

    # Another machine: its own cache, an empty --results-dir, no --data-dir.
    monkeypatch.setenv("GALAXY_TUNE_CACHE", str(tmp_path / "second-cache"))
    second = tmp_path / "second"
    assert main(["search", "lora", "--resume", "--name", "killed", "--results-dir", str(second), "--storage",
                 uri]) == 0
    assert s3_requests(s3_server, "GET", manifest) == 2  # and this driver once, into its own cache
    experiment = second / "killed"
    trials = pd.read_csv(experiment / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == KILLED_SAMPLES and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"COMPLETED", "STOPPED"}
    for trial, epochs in before.items():  # finished before the kill: kept, and not run again
        assert trials.set_index("trial_id").loc[trial, "epochs"] == epochs
        assert len((experiment / f"trial_{trial}" / "result.json").read_text().splitlines()) == epochs
    # Every trial trained from its node's copy of the shared data, never from the first driver's folder.
    for trial, epochs in zip(trials["trial_id"], trials["epochs"]):
        reports = (experiment / f"trial_{trial}" / "result.json").read_text().splitlines()
        assert {json.loads(r)["prepared"] for r in reports} == {str(node_cache / "prepared" / shared)}
    # The bucket: Ray's state, each trial's checkpoints pruned to its best and latest; none in the working copy.
    stored = stored_files(storage, "killed")
    assert any(p.startswith("experiment_state-") for p in stored) and "tuner.pkl" in stored
    for trial, epochs in zip(trials["trial_id"], trials["epochs"]):
        kept = {p.split("/")[1] for p in stored if p.startswith(f"trial_{trial}/checkpoint_")}
        assert 1 <= len(kept) <= 2 and f"checkpoint_{epochs - 1:06d}" in kept, (trial, epochs, kept)
    assert not list(experiment.glob("trial_*/checkpoint_*"))
    # galaxy_tune's files in the bucket are the working copy's, and agree with each other.
    for name in ("search.json", "space.yaml", "trials.csv", "best.json", "optuna.db", "report.md", "val_curves.png"):
        with storage.filesystem.open_input_stream(storage.path("killed", name)) as uploaded:
            assert uploaded.read() == (experiment / name).read_bytes(), name
    assert "not drawn: no result.json" not in (experiment / "report.md").read_text()  # read in the working copy
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == sorted(trials["trial_id"])
    best = json.loads((experiment / "best.json").read_text())
    assert best["complete"] is True and best["val_accuracy"] == trials["best_val_accuracy"].max()
    assert best["trial_id"] in set(trials.loc[trials["best_val_accuracy"] == best["val_accuracy"], "trial_id"])

    # A third machine retrains the bucket's search: the models and the report go to the bucket too.
    third = tmp_path / "third"
    assert main(["retrain", "--storage", uri, "--results-dir", str(third), "--name", "retrained", "--methods",
                 "lora", "--seeds", "1", "--top-k", "1", "--max-epochs", "1"]) == 0
    assert sorted(p.name for p in (third / "killed").iterdir()) == ["best.json", "search.json", "trials.csv"]
    retrained = stored_files(storage, "retrained")
    assert {"retrain.json", "test_results.csv", "report.md", "lora-seed0/hf/galaxy_tune.json"} <= retrained
    assert json.loads((third / "retrained" / "retrain.json").read_text())["data"]["prepared"] == str(
        tmp_path / "second-cache" / "prepared" / shared)
    # A fourth reports both from the bucket, without their weights, and uploads the reports.
    fourth = tmp_path / "fourth"
    assert main(["report", "--storage", uri, "--results-dir", str(fourth)]) == 0
    assert sorted(p.name for p in fourth.iterdir()) == ["killed", "retrained"]
    assert not list(fourth.glob("**/checkpoint_*")) and not list(fourth.glob("**/hf"))
    for name in ("killed/report.md", "retrained/report.md", "retrained/test_evaluation.csv"):
        with storage.filesystem.open_input_stream(storage.path(name)) as uploaded:
            assert uploaded.read() == (fourth / name).read_bytes(), name
    # And a fifth predicts with the retrained model, downloaded from the bucket.
    out = tmp_path / "fifth" / "predictions.csv"
    assert main(["predict", "--model", sub_uri(uri, "retrained", "lora-seed0", "hf"), "--images",
                 str(demo_dir / "images_training_rev1"), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == len(list((demo_dir / "images_training_rev1").glob("*.jpg")))


def refused_in_one_line(argv: list[str], results, capsys) -> str:
    assert main([*argv, "--results-dir", str(results)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert not results.exists() or list(results.iterdir()) == []  # nothing prepared, no experiment left
    return error


def test_storage_that_cannot_be_used_is_refused_before_anything_starts(demo_dir, s3_server, tmp_path, capsys):
    search = ["search", "lora", "--data-dir", str(demo_dir), "--name", "refused", *TINY_SEARCH]
    results = tmp_path / "results"
    error = refused_in_one_line([*search, "--storage", s3_uri(s3_server.endpoint, "missing")], results, capsys)
    assert "the bucket missing does not exist: create it (e.g. `aws s3 mb s3://missing`)" in error
    closed = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    error = refused_in_one_line([*search, "--storage", s3_uri(closed)], results, capsys)
    assert f"nothing answers at {closed} within 3 s" in error and time.monotonic() - started < 10
    error = refused_in_one_line([*search, "--storage", f"s3://galaxy:tune@{BUCKET}/x"], results, capsys)
    assert "give the credentials in the environment (AWS_ACCESS_KEY_ID" in error and "tune@" not in error
    error = refused_in_one_line([*search, "--storage", "nosuch://bucket/x"], results, capsys)
    assert "--storage nosuch://bucket/x: " in error and "give a URI such as s3://bucket/prefix" in error
    assert main([*search, "--storage", s3_uri(s3_server.endpoint), "--results-dir", f"s3://{BUCKET}/x"]) == 2
    assert "is not a local folder: with --storage" in capsys.readouterr().err
    error = refused_in_one_line(["search", "lora", "--resume", "--name", "nosuch", "--storage",
                                 s3_uri(s3_server.endpoint)], results, capsys)
    assert f"no search to resume: nosuch is neither in {BUCKET}/galaxy-tune nor at" in error
    # retrain, report and predict refuse alike, before anything is made.
    error = refused_in_one_line(["retrain", "--storage", s3_uri(s3_server.endpoint, "missing")], results, capsys)
    assert "the bucket missing does not exist" in error
    error = refused_in_one_line(["report", "nosuch", "--storage", s3_uri(s3_server.endpoint, prefix="empty")],
                                results, capsys)
    assert f"{BUCKET}/empty has no search or retrain nosuch: give names of folders there (it has none)" in error
    assert main(["predict", "--model", s3_uri(s3_server.endpoint, prefix="nosuch/hf"), "--images", str(demo_dir),
                 "--out", str(results / "p.csv")]) == 2
    assert "no folder there: give a retrain's <method>-seed<S>/hf folder" in capsys.readouterr().err


def test_credentials_the_server_refuses_are_refused_naming_the_variables(tmp_path, s3_server):
    """A server that checks credentials (moto's, with authentication on), given ones it does not know."""
    server, endpoint = start_s3(tmp_path / "moto.log", INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        with pytest.raises(GalaxyTuneError, match="the credentials were refused .*set AWS_ACCESS_KEY_ID and "
                                                  "AWS_SECRET_ACCESS_KEY"):
            object_storage(s3_uri(endpoint))
    finally:
        server.kill()
        server.wait()


def test_a_storage_lost_mid_search_is_said_once_and_the_search_goes_on(tmp_path, s3_server, capsys):
    """The live uploads' callback, as Ray calls it, before and after its S3 server goes away."""
    import boto3

    server, endpoint = start_s3(tmp_path / "moto.log")
    try:
        boto3.client("s3", endpoint_url=f"http://{endpoint}").create_bucket(Bucket=BUCKET)
        experiment = tmp_path / "lost"
        experiment.mkdir()
        (experiment / "trials.csv").write_text("trial_id\n1\n")
        (experiment / "optuna.db").write_bytes(b"study")
        uploads = UploadViews(object_storage(s3_uri(endpoint)), experiment)
        uploads.on_trial_complete(0, [], None)
        assert s3_requests(S3Server(endpoint, tmp_path / "moto.log"), "PUT", "lost/trials.csv") == 1
    finally:
        server.kill()
        server.wait()
    started = time.monotonic()
    uploads.on_trial_complete(1, [], None)  # one try, then says so
    assert time.monotonic() - started < 3  # not after pyarrow's retries, which took 6 s here
    assert time.time() < uploads.retry_at  # the next ones wait for the storage
    uploads.on_trial_error(2, [], None)
    uploads.on_step_end(3, [])
    uploads.retry_at -= RETRY_AFTER_S  # the wait is over: the views try again, and say nothing more
    uploads.on_trial_complete(4, [], None)
    error = capsys.readouterr().err
    assert error.count("could not upload") == 1 and "galaxy-tune/lost" in error, error
    assert time.time() < uploads.retry_at


def test_a_live_upload_tries_once_in_a_resumed_driver_too(tmp_path, capsys):
    """Against an endpoint that hangs up on each connection, as a failing server does: one connection per upload,
    where pyarrow's default retries make three."""
    connections = []

    class HangUp(socketserver.BaseRequestHandler):
        def handle(self):
            connections.append(self.client_address)

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), HangUp) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        uri = s3_uri("{}:{}".format(*server.server_address))
        (tmp_path / "trials.csv").write_text("trial_id\n1\n")
        uploads = UploadViews(Storage(uri, *fs.FileSystem.from_uri(uri)), tmp_path)
        for views in (uploads, pickle.loads(pickle.dumps(uploads))):  # as Tuner.restore gives a resumed driver
            connections.clear()
            views.on_trial_complete(0, [], None)
            assert len(connections) == 1
        server.shutdown()
    assert capsys.readouterr().err.count("could not upload") == 2


def test_a_node_fetches_a_shared_folder_once_and_refuses_a_damaged_or_too_large_one(s3_server, tmp_path):
    storage = object_storage(s3_uri(s3_server.endpoint))
    made = tmp_path / "made"
    (made / "cache").mkdir(parents=True)
    (made / "made-from.json").write_text('{"fingerprint": "1"}')
    (made / "cache" / "pixels.npy").write_bytes(os.urandom(3 << 20))
    files = ["made-from.json", "cache/pixels.npy"]
    name, uploaded = storage.share_folder(made, files, identity=["made-from.json"])
    assert uploaded and storage.share_folder(made, files, identity=["made-from.json"]) == (name, False)
    # Trials that start at once on one node: one downloads, the others wait for it.
    with ThreadPoolExecutor(4) as trials:
        fetched = set(trials.map(lambda _: storage.fetch_folder(name, tmp_path / "node", "10.0.0.7"), range(4)))
    assert len(fetched) == 1 and s3_requests(s3_server, "GET", f"{name}/manifest.json") == 1
    assert ((tmp_path / "node" / name / "cache" / "pixels.npy").read_bytes()
            == (made / "cache" / "pixels.npy").read_bytes())
    # A file changed in the storage since its upload is refused, and nothing is left in the cache.
    with storage.filesystem.open_output_stream(storage.path("shared", name, "cache/pixels.npy")) as out:
        out.write(os.urandom(3 << 20))
    with pytest.raises(GalaxyTuneError, match=r"node 10\.0\.0\.7: cache/pixels.npy of the shared data .* is not what "
                                              "was uploaded"):
        storage.fetch_folder(name, tmp_path / "other-node", "10.0.0.7")
    assert [p.name for p in (tmp_path / "other-node").iterdir()] == [f"{name}.lock"]
    # A search's stop mark (SIGTERM: checkpoint at the epoch's end) is an object there, which every node sees.
    mark = StopMark(storage.path("marked", STOP_MARKER), storage.filesystem)
    assert not mark.is_set()
    mark.set()
    assert mark.is_set() and pickle.loads(pickle.dumps(mark)).is_set()  # as Ray hands it to a trial
    mark.clear()
    mark.clear()  # once the search ends too
    assert not mark.is_set()
    # More than the node's disk holds.
    with storage.filesystem.open_output_stream(storage.path("shared", "huge", "manifest.json")) as out:
        out.write(json.dumps({"cache/pixels.npy": {"size": 10**18, "sha256": "0"}}).encode())
    with pytest.raises(GalaxyTuneError, match=r"node 10\.0\.0\.7: the prepared data huge needs 1000000000\.00 GB in "
                                              r".*, which has [0-9.]+ GB free: .*GALAXY_TUNE_CACHE"):
        storage.fetch_folder("huge", tmp_path / "node", "10.0.0.7")


def test_a_folder_uri_is_a_storage_too(tmp_path):
    storage = object_storage((tmp_path / "store").as_uri())
    assert (tmp_path / "store").is_dir()
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "trials.csv").write_text("trial_id\n")
    assert storage.upload_views(tmp_path / "exp", ["trials.csv", "best.json"])  # best.json: not there yet
    assert [p.name for p in (tmp_path / "store" / "exp").iterdir()] == ["trials.csv"]
    name, uploaded = storage.share_folder(tmp_path / "exp", ["trials.csv"], identity=["trials.csv"])
    fetched = storage.fetch_folder(name, tmp_path / "node", "10.0.0.7")
    assert uploaded and (fetched / "trials.csv").read_text() == "trial_id\n"
