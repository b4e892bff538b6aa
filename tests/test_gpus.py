"""GPU trials without a GPU: a Ray node with 2 logical GPUs schedules trials as a GPU node would, and torch's own
argument checks judge the device each trial picks.

The node's GPU ids, 98 and 99, are ones no machine has: Ray sets each trial's CUDA_VISIBLE_DEVICES as on a GPU node,
and torch sees no GPU there, on this machine as on a GPU one. The drivers see no GPU either.
"""

import json
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from torch.cuda._utils import _get_device_index

from conftest import RAY, TINY_SEARCH, free_port, shell_environment, start_node, stop_nodes
from galaxy_tune.cli import main

pytestmark = pytest.mark.skipif(RAY is None, reason="the ray CLI is not installed")
GPU_IDS = ("98", "99")
CPUS = 4


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """A Ray head with 4 CPUs and 2 logical GPUs, on its own ports and temp dir; yields its address."""
    temp_dir = tempfile.mkdtemp(prefix="gt-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    head = start_node(["--head", "--port", str(port), "--num-cpus", str(CPUS), "--num-gpus", str(len(GPU_IDS)),
                       "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
                       "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp_dir],
                      tmp_path_factory.mktemp("ray-logs") / "head.log",
                      {**shell_environment(), "CUDA_VISIBLE_DEVICES": ",".join(GPU_IDS)})
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_nodes(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def without_a_gpu() -> dict[str, str]:
    """The environment of a driver on a machine with no GPU."""
    return {**shell_environment(), "CUDA_VISIBLE_DEVICES": ""}


GPU_SHARE_CASES = [(0.25, "cuda"), (0.5, "cuda"), (1, "cuda"), (None, "auto"), (None, "cpu")]
PROBES = {
    # check_resources, as the driver calls it, for each case.
    "shares": ("import json, sys; from galaxy_tune.search.cluster import check_resources, start_ray; "
               "start_ray(sys.argv[1]); "
               f"print(json.dumps([check_resources(0.5, gpus, device, None) for gpus, device in {GPU_SHARE_CASES!r}]))"),
    # trial_device, as each trial calls it, in Ray workers given 0.25, 0.5 and 1 GPU.
    "devices": """if True:
        import json, os, sys, ray
        from galaxy_tune.search.cluster import start_ray, trial_device

        def choose(gpus):
            device, memory_share = trial_device(gpus)
            return str(device), memory_share, os.environ["CUDA_VISIBLE_DEVICES"]

        start_ray(sys.argv[1])
        print(json.dumps([ray.get(ray.remote(num_cpus=0, num_gpus=g)(choose).remote(g)) for g in (0.25, 0.5, 1)]))
        """}


@pytest.fixture(scope="module")
def drivers(gpu_cluster, demo_dir, tmp_path_factory) -> dict[str, subprocess.Popen]:
    """Drivers on a machine without a GPU, all started at once: each probe, and the README's GPU search (a LoRA
    search at 0.5 GPU per trial) in the results folder `drivers["readme"].results`."""
    results = tmp_path_factory.mktemp("readme-gpus")
    argv = {name: ["-c", probe, gpu_cluster] for name, probe in PROBES.items()}
    argv["readme"] = ["-m", "galaxy_tune", "search", "lora", "--address", gpu_cluster, "--gpus-per-trial", "0.5",
                      "--num-samples", "1", "--max-failures", "0", "--data-dir", str(demo_dir), "--results-dir",
                      str(results), "--name", "gpus", *TINY_SEARCH]
    started = {name: subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=without_a_gpu()) for name, args in argv.items()}
    started["readme"].results = results
    yield started
    for process in started.values():
        process.kill()
        process.wait()


def probed(process: subprocess.Popen):
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1])


def test_gpu_shares_set_how_many_trials_run_at_once(drivers):
    # 4 CPUs hold 8 trials of half a CPU; 2 GPUs hold 8 quarter-GPU trials, 4 half-GPU ones or 2 whole-GPU ones.
    # With GPUs in the cluster, auto gives each trial a whole one; cpu gives none.
    assert probed(drivers["shares"]) == [[0.25, 8], [0.5, 4], [1.0, 2], [1.0, 2], [0.0, 8]]


def test_a_trial_trains_on_its_gpu_by_index_capped_at_its_share_of_memory(drivers):
    for (device, memory_share, visible), gpus in zip(probed(drivers["devices"]), (0.25, 0.5, 1)):
        assert visible in GPU_IDS  # Ray lists the trial's GPU alone, so torch numbers it 0 ...
        # ... and set_per_process_memory_fraction, which caps a shared GPU, needs that index: torch's own check.
        assert _get_device_index(torch.device(device)) == 0
        assert memory_share == gpus  # the cap applies below 1


def test_the_readme_gpu_search_takes_a_trial_to_its_gpu_from_a_driver_without_one(drivers):
    driver = drivers["readme"]
    _, err = driver.communicate(timeout=300)
    # The trial got as far as opening its GPU, which torch cannot here: the search ends with every trial failed, in
    # a last line that names the trial's device and its share of the GPU's memory.
    error = err.strip().splitlines()[-1]
    assert driver.returncode == 2 and error.startswith("error: every trial of"), err[-3000:]
    assert "gave this trial cuda:0 (CUDA_VISIBLE_DEVICES=9" in error
    assert "50% of its memory) but torch there sees no GPU" in error
    searched = json.loads((driver.results / "gpus" / "search.json").read_text())
    assert (searched["gpus_per_trial"], searched["concurrency"]) == (0.5, 4)  # 4 CPUs, 4 half GPUs


def test_cuda_trials_with_no_gpu_are_refused_in_one_line(gpu_cluster, demo_dir, tmp_path, capsys):
    assert main(["search", "full", "--address", gpu_cluster, "--device", "cuda", "--gpus-per-trial", "0",
                 "--num-samples", "1", "--max-epochs", "1", "--data-dir", str(demo_dir), "--results-dir",
                 str(tmp_path), *TINY_SEARCH]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--device cuda with --gpus-per-trial 0" in error, error
    assert "--gpus-per-trial 0.5" in error and "--device cpu" in error  # the fixes
    assert list(tmp_path.iterdir()) == []
