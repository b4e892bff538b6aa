"""The README's cluster recipe, for real: a head and a worker started with the `ray start` CLI, token
authentication as Ray defaults it, and `search --address` from a shell with no extra environment."""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import RAY, free_port, shell_environment, start_node, stop_nodes
from galaxy_tune.search.cluster import check_cluster
from galaxy_tune.errors import GalaxyTuneError
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head and worker as the README starts them, on their own ports and temp dir; yields the head address."""
    logs = tmp_path_factory.mktemp("ray-logs")
    temp_dir = tempfile.mkdtemp(prefix="gt-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    env = shell_environment()
    head = start_node(["--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
                       "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                       "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp_dir, "--num-cpus", "1"],
                      logs / "head.log", env)
    nodes = [head]
    try:
        # The worker as the README starts it: Ray 2.60's `ray start --address` does not turn token mode on.
        nodes.append(start_node(["--address", f"127.0.0.1:{port}", "--num-cpus", "1",
                                 "--dashboard-agent-listen-port", str(free_port())],
                                logs / "worker.log", {**env, "RAY_AUTH_MODE": "token"}))
        wait_for_nodes(f"127.0.0.1:{port}", 2, env)
        yield f"127.0.0.1:{port}"
    finally:
        stop_nodes(*nodes)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_search_joins_a_token_cluster_started_with_ray_start_and_uses_both_nodes(cluster, demo_dir, tmp_path):
    # Trials that outlast a worker's start (ResNet-50, 64 px): a pending trial goes to the first free worker, and
    # short ones would all reuse the head's while the other node's worker is still importing torch.
    done = subprocess.run(
        [sys.executable, "-m", "galaxy_tune", "search", "full", "--address", cluster, "--data-dir", str(demo_dir),
         "--results-dir", str(tmp_path / "results"), "--model", "resnet50-random", "--image-size", "64", "--crop",
         "256", "--num-samples", "2", "--max-epochs", "3", "--name", "cluster"],
        capture_output=True, text=True, timeout=600, env=shell_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "InvalidAuthToken" not in done.stderr
    trials = pd.read_csv(tmp_path / "results" / "cluster" / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) <= {"COMPLETED", "STOPPED"}
    best = json.loads((tmp_path / "results" / "cluster" / "best.json").read_text())
    assert best["concurrency"] == 2  # one trial per node: each has one CPU
    assert trials["node_id"].nunique() == 2, done.stdout[-3000:]  # trials ran on the head and on the worker


def test_joining_with_a_wrong_token_fails_in_one_line_naming_the_fix(cluster, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-cluster-token")
    started = time.monotonic()
    with pytest.raises(GalaxyTuneError, match="refused this machine's token .* `ray get-auth-token`"):
        check_cluster(cluster)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(Path(tempfile.mkdtemp())))  # no ~/.ray/auth_token
    with pytest.raises(GalaxyTuneError, match="uses token authentication and this machine has no token"):
        check_cluster(cluster)
    assert time.monotonic() - started < 30


def test_a_node_that_cannot_see_the_prepared_data_says_which_and_how_to_fix_it(tmp_path):
    with pytest.raises(GalaxyTuneError, match=r"node \S+ cannot see the prepared data .*mount --results-dir"):
        load_prepared_on_this_node(tmp_path / "not-mounted-here", 32, 256)
