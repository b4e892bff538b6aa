"""Shared fixtures: a small generated Kaggle-format data set, its prepared cache, one local Ray, one finished
LoRA search, one search watched as it runs, a bomb JPEG, MLflow servers; helpers that start Ray nodes with the
`ray start` CLI."""

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
from PIL import Image

from galaxy_tune.data.prepare import DataConfig, prepare
from galaxy_tune.data.demo import write_demo_data

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE_SIZE_PX, CROP_PX = 32, 256
# A search of the tiny ResNet on the demo data at 32 px; SEARCH: of 2 epochs at most.
TINY_SEARCH = ["--image-size", str(IMAGE_SIZE_PX), "--crop", str(CROP_PX), "--model", "tiny"]
SEARCH = [*TINY_SEARCH, "--max-epochs", "2"]


def jpeg_claiming(side: int) -> bytes:
    """A tiny JPEG whose header claims side x side pixels: a decompression bomb to PIL, in 631 bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 40, 40)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")  # SOF0: marker, length, precision, then height and width
    data[frame + 5:frame + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def randomise_batchnorm(model) -> None:
    """Statistics and affine parameters unlike a fresh BatchNorm's (1, 0), so folding them in is tested."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """120 synthetic galaxies in the exact Kaggle layout (read-only for tests: copy it to modify it)."""
    return write_demo_data(tmp_path_factory.mktemp("demo"), num_images=120, seed=1)


@pytest.fixture(scope="session")
def prepared(demo_dir, tmp_path_factory):
    """The demo data prepared at 32 px: split manifest and pixel cache."""
    config = DataConfig(demo_dir, image_size_px=IMAGE_SIZE_PX, crop_px=CROP_PX)
    return prepare(config, tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray (2 CPUs, no dashboard) for every test that runs a search. Its node's cache of data shared
    through object storage is a folder of the test session's (its workers inherit the variable)."""
    import ray

    os.environ["GALAXY_TUNE_CACHE"] = str(tmp_path_factory.mktemp("node-cache"))
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)  # the same on a GPU machine
    yield ray
    ray.shutdown()


BUCKET = "results"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "galaxy", "AWS_SECRET_ACCESS_KEY": "tune", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server(NamedTuple):
    endpoint: str  # host:port
    log: Path  # the server's log: a line per request


def start_s3(log: Path, **env) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port of 127.0.0.1, once it answers; and its host:port."""
    port = free_port()
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            return server, f"127.0.0.1:{port}"
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3 server with the bucket `results`, and credentials in this process's environment as a user sets
    them (Ray passes them on to the trials); stopped by its PID."""
    import boto3

    saved = {k: os.environ.get(k) for k in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    server, endpoint = start_s3(log)
    try:
        boto3.client("s3", endpoint_url=f"http://{endpoint}").create_bucket(Bucket=BUCKET)
        yield S3Server(endpoint, log)
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def s3_uri(endpoint: str, bucket: str = BUCKET, prefix: str = "galaxy-tune") -> str:
    return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http"


def s3_requests(server: S3Server, method: str, ending: str) -> int:
    """How many requests of `method` for a key ending in `ending` the server has logged."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", server.log.read_text()).splitlines()  # its log colours some lines
    requests = [line.split('"')[1].split() for line in lines if line.count('"') >= 2]
    return sum(r[0] == method and r[1].split("?")[0].endswith(ending) for r in requests if len(r) == 3)


@pytest.fixture(scope="session")
def lora_search(ray_local, demo_dir, tmp_path_factory) -> Path:
    """The experiment folder of a finished 3-trial LoRA search, run as a user runs it. Tests never change it: they
    copy it into a results folder of their own, or add their own experiments beside it."""
    from galaxy_tune.cli import main

    results = tmp_path_factory.mktemp("lora-search")
    assert main(["search", "lora", "--data-dir", str(demo_dir), "--results-dir", str(results), "--name",
                 "search-lora", "--num-samples", "3", *SEARCH]) == 0
    return results / "search-lora"


RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
READY = "This command will now block forever"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def shell_environment() -> dict[str, str]:
    """This test process's environment without what its own local Ray set (RAY_AUTH_MODE, RAY_ADDRESS)."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}


def hiding(paths: tuple[Path, ...]) -> list[str]:
    """A command prefix: the command runs in a mount namespace of its own (Linux), with an empty folder over each
    of `paths`, which it and its processes then cannot see; none when `paths` is empty."""
    if not paths:
        return []
    mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(path))}" for path in paths)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh"]


def can_hide(folder: Path) -> bool:
    """Whether this machine lets a test hide a folder from a process (`hiding`): root, or a user namespace."""
    return subprocess.run([*hiding((folder,)), "true"], capture_output=True).returncode == 0


def start_node(args: list[str], log: Path, env: dict[str, str], hidden: tuple[Path, ...] = ()) -> subprocess.Popen:
    """`ray start ... --block` in its own process group, its processes blind to `hidden`; returns once the node is
    up."""
    env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # stop at once (not drain 30 s for a dead GCS)
    with log.open("w") as out:
        node = subprocess.Popen([*hiding(hidden), RAY, "start", *args, "--block", "--disable-usage-stats"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 90
    while READY not in log.read_text():
        if node.poll() is not None or time.monotonic() > deadline:
            stop_nodes(node)
            pytest.fail(f"`ray start {' '.join(args)}` did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return node


def stop_nodes(*nodes: subprocess.Popen) -> None:
    """SIGTERM to each blocking `ray start` and the processes it started (its process group, and only those), all
    at once; SIGKILL to the groups still running a second later (`ray start` would stop its processes one after
    the other, giving each a second)."""
    running = [node for node in nodes if node.poll() is None]
    for node in running:
        os.killpg(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + 1.0
    for node in running:
        try:
            node.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()


class MlflowServer(NamedTuple):
    process: subprocess.Popen  # `mlflow server`, in its own process group
    uri: str
    log: Path


def launch_mlflow(folder: Path) -> MlflowServer:
    """`mlflow server` on 127.0.0.1 and a free port, its runs in sqlite and its artifacts in `folder`; returns at
    once. It answers about 10 s later, after importing MLflow twice (its command, then its uvicorn worker)."""
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
             str(folder / "artifacts")], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job workers: runs only
    return MlflowServer(server, f"http://127.0.0.1:{port}", log)


def answering(server: MlflowServer) -> MlflowServer:
    """The server once it answers; fails the test if it ended or did not answer within 90 s."""
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            pass
        if server.process.poll() is not None or time.monotonic() > deadline:
            stop_mlflow(server.process)
            pytest.fail(f"`mlflow server` did not come up:\n{server.log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop_mlflow(server: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    """The server and the workers it started, by its process group."""
    if server.poll() is None:
        os.killpg(server.pid, signum)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


MLFLOW_SERVERS = ("mlflow_server", "doomed_mlflow_server")


@pytest.fixture(scope="session", autouse=True)
def launched_mlflow(request, tmp_path_factory) -> dict[str, MlflowServer]:
    """The MLflow servers that the selected tests use, launched as the session starts, so that their start-up
    overlaps the first tests instead of holding up their own: fixture name -> server."""
    used = {name for item in request.session.items for name in item.fixturenames} & set(MLFLOW_SERVERS)
    launched = {name: launch_mlflow(tmp_path_factory.mktemp(name)) for name in sorted(used)}
    yield launched
    for server in launched.values():
        stop_mlflow(server.process)


@pytest.fixture(scope="session")
def mlflow_server(launched_mlflow) -> str:
    """One MLflow tracking server for the tests that log to it; its URI."""
    return answering(launched_mlflow["mlflow_server"]).uri


@pytest.fixture(scope="session")
def doomed_mlflow_server(launched_mlflow) -> MlflowServer:
    """A server of its own for the search that kills it."""
    return answering(launched_mlflow["doomed_mlflow_server"])


def kill_once_a_trial_is_logged(uri: str, group: int, name: str) -> None:
    """Kill the server at `uri` (kill -9 of its process group) once a trial's run of the search `name` has an
    epoch."""
    from mlflow import MlflowClient

    client, deadline = MlflowClient(uri), time.monotonic() + 120
    while time.monotonic() < deadline:
        found = client.get_experiment_by_name(name)
        if found and any(run.data.metrics for run in client.search_runs(
                [found.experiment_id], "tags.`galaxy_tune.role` = 'trial'")):
            break
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)


class WatchedSearch(NamedTuple):
    experiment: Path
    looks: list[dict]  # what a user read after each trial's end: the live study, trials.csv, best.json, Ray's trials
    finish_passes: list[str]  # what each final pass over the study did
    out: str
    err: str
    mlflow_uri: str


@pytest.fixture(scope="session")
def watched_search(ray_local, demo_dir, doomed_mlflow_server, tmp_path_factory) -> WatchedSearch:
    """A 4-trial LoRA search, one trial at a time, run as a user runs it and watched as it runs: a callback added
    to the search's own reads its files after each trial's end. At the first trial's end, the callback waits for
    that trial's run to have an epoch in MLflow, then kills the server (kill -9): three trials run without it."""
    import optuna
    from ray import tune

    from galaxy_tune.cli import main

    search = importlib.import_module("galaxy_tune.search.run")  # the module (galaxy_tune.search is the API call)
    results, server = tmp_path_factory.mktemp("watched"), doomed_mlflow_server
    uri, group = server.uri, server.process.pid  # what the callback, which Ray pickles, may hold
    experiment, looks, passes, out, err = results / "dies", [], [], io.StringIO(), io.StringIO()

    class Probe(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if not looks:
                kill_once_a_trial_is_logged(uri, group, experiment.name)
            live = optuna.load_study(study_name=experiment.name, storage=f"sqlite:///{experiment / 'optuna.db'}")
            looks.append({"study": [(t.user_attrs["ray_trial_id"], t.state, dict(t.intermediate_values))
                                    for t in live.trials],
                          "trials": pd.read_csv(experiment / "trials.csv"),
                          "best": json.loads((experiment / "best.json").read_text()),
                          "ray": {t.trial_id: t.status for t in trials}})

    make, finish = search.watchers, search.finish_study
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            patch.setattr(search, "watchers", lambda *args: [*make(*args), Probe()])
            patch.setattr(search, "finish_study", lambda *args: passes.append(finish(*args)) or passes[-1])
            assert main(["search", "lora", "--data-dir", str(demo_dir), "--results-dir", str(results), "--name",
                         experiment.name, "--num-samples", "4", "--max-concurrent", "1", *SEARCH, "--mlflow",
                         server.uri]) == 0, err.getvalue()[-3000:]
    finally:
        stop_mlflow(server.process, signal.SIGKILL)
    return WatchedSearch(experiment, looks, passes, out.getvalue(), err.getvalue(), server.uri)


def mlflow_search(uri: str, experiment: Path) -> tuple[list, dict[str, list]]:
    """A search's runs as MLflow holds them: its parent runs (tagged with search.json's id) and, by Ray trial id,
    the live trial runs nested under the first parent."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    search_id = json.loads((experiment / "search.json").read_text())["mlflow_search_id"]
    found = client.get_experiment_by_name(experiment.name)
    parents = client.search_runs([found.experiment_id], filter_string=f"tags.`galaxy_tune.search_id` = '{search_id}'")
    children: dict[str, list] = {}
    for run in client.search_runs([found.experiment_id], "tags.`galaxy_tune.role` = 'trial'", max_results=1000):
        if parents and run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id:
            children.setdefault(run.data.tags["galaxy_tune.ray_trial_id"], []).append(run)
    return parents, children


def epochs_logged(uri: str, run, metric: str = "val_accuracy") -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, metric))


A_BIGGER_MACHINE = {"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 16, "GPU": 1})}  # what a Ray started here would see


def start_search_args(demo_dir, results_dir, name: str, samples: int) -> list[str]:
    return ["--data-dir", str(demo_dir), "--results-dir", str(results_dir), "--name", name, "--num-samples",
            str(samples), "--max-epochs", "3", *TINY_SEARCH]


def start_search(ray_local, method: str, name: str, demo_dir, results_dir, samples: int,
                 ray_env: dict[str, str] | None = None, resume_auto: bool = False, extra: tuple[str, ...] = (),
                 **popen) -> subprocess.Popen:
    """`search` as a user starts it, in its own process group, joining the test's Ray.

    Its own Ray would see this machine's CPUs and GPUs; the test's has 2 CPUs and no GPU on any machine. The
    driver is told it runs on a 16-core machine with a GPU, which must change nothing.
    """
    argv = [sys.executable, "-m", "galaxy_tune", "search", method,
            *start_search_args(demo_dir, results_dir, name, samples),
            "--address", ray_local.get_runtime_context().gcs_address, *(["--resume", "auto"] if resume_auto else []),
            *extra]
    return subprocess.Popen(argv, start_new_session=True, env={**os.environ, **A_BIGGER_MACHINE, **(ray_env or {})},
                            **popen)


def kill_driver(driver: subprocess.Popen) -> None:
    """kill -9 of a driver that `start_search` started, and of its process group, as a crash would (Ray ends the
    dead driver's trials); a driver that already ended is left alone, so that the test's own failure shows."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()


def wait_for(predicate, timeout, what, driver: subprocess.Popen):
    """Until `predicate()` holds; fails at once if the driver ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if driver.poll() is not None:
            raise AssertionError(f"the search ended (exit {driver.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
