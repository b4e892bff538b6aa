"""`search --storage`: Ray's results and the prepared data in object storage, against a real S3 server (moto's, the
session's `s3_server`)."""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from pyarrow import fs

from conftest import BUCKET, TINY_SEARCH, free_port, s3_requests, s3_uri, start_s3
from galaxy_tune.cli import main
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.storage import object_storage

def test_a_search_keeps_rays_results_in_the_bucket_and_a_working_copy_here(ray_local, demo_dir, s3_server, tmp_path,
                                                                          capsys):
    uri, local = s3_uri(s3_server.endpoint), tmp_path / "local"
    argv = ["search", "lora", "--results-dir", str(local), "--name", "stored", "--storage", uri]
    assert main([*argv, "--data-dir", str(demo_dir), "--num-samples", "3", "--checkpoint-every", "0", *TINY_SEARCH,
                 "--max-epochs", "3"]) == 0
    storage, experiment = object_storage(uri), local / "stored"
    # The prepared data: uploaded once, and downloaded once into this node's cache, where every trial read it.
    [shared] = [line.split()[-1] for line in capsys.readouterr().out.splitlines()
                if line.startswith("prepared data uploaded to ")]
    assert s3_requests(s3_server, "GET", f"{shared.rpartition('/')[2]}/manifest.json") == 1
    cached = Path(os.environ["GALAXY_TUNE_CACHE"]) / "prepared" / shared.rpartition("/")[2]
    assert (cached / "manifest.json").is_file()
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
        reports = (experiment / f"trial_{trial}" / "result.json").read_text().splitlines()
        assert len(reports) == epochs and {json.loads(r)["prepared"] for r in reports} == {str(cached)}
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
    assert f"prepared data already in {shared}" in capsys.readouterr().out  # a second search uploads nothing
    resumed = pd.read_csv(experiment / "trials.csv", dtype={"trial_id": str})
    # The same rows and columns; their order follows Ray's trial order, which a restore may change.
    pd.testing.assert_frame_equal(*(t.sort_values("trial_id", ignore_index=True) for t in (resumed, trials)),
                                  check_like=True)


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
