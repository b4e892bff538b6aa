"""The README's cluster recipe, for real: a head and a worker started with the `ray start` CLI, token
authentication as Ray defaults it, and `search --address` from a shell with no extra environment. The nodes share
no path: the search keeps its results and its prepared data in object storage (the session's S3 server), and each
node has a cache of its own."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import optuna
import pandas as pd
import pytest

from conftest import RAY, can_hide, free_port, s3_requests, s3_uri, shell_environment, start_node, stop_nodes
from galaxy_tune.search.cluster import check_cluster
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.layout import trial_reports
from galaxy_tune.search.trainable import load_prepared_on_this_node

pytestmark = pytest.mark.skipif(RAY is None, reason="the ray CLI is not installed")


def wait_for_nodes(address: str, count: int, env: dict[str, str]) -> None:
    """Until `count` nodes are alive (a worker registers a moment after its `ray start` says it is up)."""
    probe = ("import sys, ray; from galaxy_tune.search.cluster import start_ray; start_ray(sys.argv[1]); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, env=env)
        if done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the cluster at {address} did not reach {count} nodes: {done.stdout[-500:]}"
                        f"{done.stderr[-1500:]}")
        time.sleep(1)


class Cluster(NamedTuple):
    address: str  # the head's
    nodes: dict[str, subprocess.Popen]  # each node's blocking `ray start`: head, worker
    caches: dict[str, Path]  # each node's cache (GALAXY_TUNE_CACHE) of data shared through object storage
    hidden: tuple[Path, ...]  # what the nodes cannot see: this test session's folders (its data, its results)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head and worker as the README starts them, on their own ports and temp dir. Where the machine allows it,
    neither node sees this test session's folders, where the drivers keep their data and results: as on machines
    that share no path."""
    logs = tmp_path_factory.mktemp("ray-logs")
    temp_dir = tempfile.mkdtemp(prefix="gt-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = shell_environment()
    caches = {node: Path(temp_dir, f"{node}-cache") for node in ("head", "worker")}
    session = tmp_path_factory.getbasetemp()
    hidden = (session,) if can_hide(session) else ()
    # The head declares a node dead after 2 missed health checks 0.5 s apart (Ray's default: 5, 3 s apart).
    head = start_node(["--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
                       "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                       "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp_dir, "--num-cpus", "1"],
                      logs / "head.log", {**env, "GALAXY_TUNE_CACHE": str(caches["head"]),
                                          "RAY_health_check_period_ms": "500",
                                          "RAY_health_check_timeout_ms": "500",
                                          "RAY_health_check_failure_threshold": "2"}, hidden)
    nodes = [head]
    try:
        # The worker as the README starts it: Ray 2.60's `ray start --address` does not turn token mode on.
        nodes.append(start_node(["--address", f"127.0.0.1:{port}", "--num-cpus", "1",
                                 "--dashboard-agent-listen-port", str(free_port())],
                                logs / "worker.log", {**env, "RAY_AUTH_MODE": "token",
                                                      "GALAXY_TUNE_CACHE": str(caches["worker"])}, hidden))
        wait_for_nodes(f"127.0.0.1:{port}", 2, env)
        yield Cluster(f"127.0.0.1:{port}", dict(zip(("head", "worker"), nodes)), caches, hidden)
    finally:
        stop_nodes(*nodes)
        shutil.rmtree(temp_dir, ignore_errors=True)


class ReportedTrials:
    """Trials whose second epoch the driver has, from the study it mirrors live. Ray takes an epoch's checkpoint
    in a call to the trial of its own, after the epoch's result, and asks for the next epoch once it has it: a
    trial's second epoch is there only once Ray knows its first checkpoint. The study is opened once: opening it
    costs a tenth of a CPU-second, which each poll would take from the trials, one per CPU."""

    def __init__(self, experiment: Path):
        self.database, self.study = experiment / "optuna.db", None

    def __call__(self) -> int:
        if self.study is None and self.database.is_file():  # opening a missing one would make it
            try:
                self.study = optuna.load_study(study_name="cluster", storage=f"sqlite:///{self.database}")
            except Exception:  # the driver has not made it yet
                pass
        return 0 if self.study is None else sum(len(trial.intermediate_values) >= 2 for trial in self.study.trials)


def descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def lose_node(node: subprocess.Popen) -> None:
    """kill -9 of a node's `ray start` and of every process it started (its raylet, its trials' workers), as a
    reclaimed VM loses them."""
    for pid in [*descendants(node.pid), node.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.wait()


def test_a_search_on_a_token_cluster_uses_both_nodes_and_survives_losing_one(cluster, demo_dir, s3_server, tmp_path):
    experiment = tmp_path / "results" / "cluster"
    if cluster.hidden:  # each node sees an empty folder where the data and the results are (its mount namespace's)
        for node in cluster.nodes.values():
            assert not Path(f"/proc/{node.pid}/root", *demo_dir.parts[1:]).exists() and demo_dir.is_dir()
            assert not Path(f"/proc/{node.pid}/root", *tmp_path.parts[1:]).exists() and tmp_path.is_dir()
    else:
        warnings.warn("this machine does not let a test hide folders from a process (`unshare --mount`): the nodes "
                      "see the driver's data, which the trials must not read")
    # Trials that outlast a worker's start (the tiny ResNet at 256 px, 6 epochs of a second or two): a pending trial
    # goes to the first free worker, and short ones would all reuse the head's while the other node's worker is
    # still importing torch. Both run at once, one per node (each node has one CPU). Each checkpoints every epoch
    # and runs every epoch (no early stopping), so the one on the node lost after its second epoch has a checkpoint
    # to continue from, and epochs left to run.
    driver = subprocess.Popen(
        [sys.executable, "-m", "galaxy_tune", "search", "full", "--address", cluster.address, "--data-dir",
         str(demo_dir), "--results-dir", str(tmp_path / "results"), "--model", "tiny", "--image-size",
         "256", "--crop", "256", "--num-samples", "2", "--max-epochs", "6", "--scheduler", "fifo",
         "--checkpoint-every", "0", "--name", "cluster", "--storage", s3_uri(s3_server.endpoint)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=shell_environment())
    try:
        deadline, reported_trials = time.monotonic() + 300, ReportedTrials(experiment)
        while reported_trials() < 2:
            assert driver.poll() is None and time.monotonic() < deadline, "the two trials did not report 2 epochs"
            time.sleep(0.2)
        lose_node(cluster.nodes["worker"])
        out, err = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, err[-3000:]
    assert "InvalidAuthToken" not in err
    trials = pd.read_csv(experiment / "trials.csv")
    assert len(trials) == 2 and trials["trial_id"].is_unique and set(trials["status"]) == {"COMPLETED"}
    best = json.loads((experiment / "best.json").read_text())
    assert best["concurrency"] == 2  # one trial per node: each has one CPU
    # The trial on the lost worker went on from its checkpoint on the head, and the console and best.json say so.
    [moved] = [t for t in trials["trial_id"] if (experiment / f"trial_{t}" / "error.txt").is_file()]
    lost = re.search(r"its node has died\. Node Id: (\w+)", (experiment / f"trial_{moved}" / "error.txt").read_text())
    assert lost and set(trials["node_id"]) == {trials["node_id"][0]} != {lost[1]}  # the worker, not the head
    on_head = [r["epoch"] for r in trial_reports(experiment / f"trial_{moved}") if r["node_id"] != lost[1]]
    assert on_head[0] > 1, on_head  # not from epoch 1 again
    assert f"trial {moved}: its node was lost; retried from its last checkpoint" in out, out[-3000:]
    assert best["retried"] == [{"trial_id": moved, "failures": ["node lost"]}]
    study = optuna.load_study(study_name="cluster", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert sorted(t.user_attrs["ray_trial_id"] for t in study.trials) == sorted(trials["trial_id"])
    # No shared path: each node downloaded the prepared data once, into its own cache, and its trials read it there.
    [shared] = [line.split()[-1].rpartition("/")[2] for line in out.splitlines()
                if line.startswith("prepared data uploaded to ")]
    assert s3_requests(s3_server, "GET", f"{shared}/manifest.json") == 2
    local = {node: str(cache / "prepared" / shared) for node, cache in cluster.caches.items()}
    assert all(Path(folder, "manifest.json").is_file() for folder in local.values())
    read = {r["prepared"] for t in trials["trial_id"] for r in trial_reports(experiment / f"trial_{t}")}
    assert read == set(local.values())
    assert not list(experiment.glob("trial_*/checkpoint_*"))  # the checkpoints, the lost node's too, are stored


def test_joining_with_a_wrong_token_fails_in_one_line_naming_the_fix(cluster, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-cluster-token")
    started = time.monotonic()
    with pytest.raises(GalaxyTuneError, match="refused this machine's token .* `ray get-auth-token`"):
        check_cluster(cluster.address)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(Path(tempfile.mkdtemp())))  # no ~/.ray/auth_token
    with pytest.raises(GalaxyTuneError, match="uses token authentication and this machine has no token"):
        check_cluster(cluster.address)
    assert time.monotonic() - started < 30


def test_a_node_that_cannot_see_the_prepared_data_says_which_and_how_to_fix_it(tmp_path):
    with pytest.raises(GalaxyTuneError, match=r"node \S+ cannot see the prepared data .*mount --results-dir"):
        load_prepared_on_this_node(tmp_path / "not-mounted-here", 32, 256)
