"""`bench loader|train|search|gpu`: the figures' JSON structure and the definitions of their ratios (never a speed).

The ratio helpers run on hand-made inputs whose answer is known; each benchmark runs once at the smallest size,
and `bench gpu` once as its CPU dry run, so the GPU check can't rot.
"""

import json
import math
import os
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import CROP_PX, IMAGE_SIZE_PX, s3_uri

from galaxy_tune import cli, layout
from galaxy_tune.bench import bench_loader, bench_search, bench_train, write_json
from galaxy_tune.bench.loader import timed_epochs_in_turns
from galaxy_tune.bench.measure import MB, interleaved, rate, ratio_spread, split_evenly
from galaxy_tune.bench.searching import STRATEGIES, most_at_once, search_environment, search_figures
from galaxy_tune.search.strategy import SAMPLERS, SCHEDULERS
from galaxy_tune.report.search_curves import best_so_far, epochs_to_reach, median_interval, summarize
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.storage import object_storage, sub_uri
from galaxy_tune.train import training_precision

CPU = torch.device("cpu")
ENVIRONMENT = {"device", "device_name", "cpu_count", "torch_threads", "python", "torch", "torchvision", "platform",
               "measured_at"}


def saved_and_read_back(figures: dict, path) -> dict:
    write_json(figures, path)
    return json.loads(path.read_text())


# ---------------------------------------------------------------- the ratios, on hand-made inputs


def test_epochs_to_reach_counts_trial_epochs_until_the_best_so_far_reaches_the_target():
    curve = best_so_far([0.50, 0.70, 0.60, 0.90])  # val accuracy of each trial-epoch, in time order
    assert curve.tolist() == [0.50, 0.70, 0.70, 0.90]
    assert epochs_to_reach(curve, 0.50) == 1
    assert epochs_to_reach(curve, 0.65) == 2
    assert epochs_to_reach(curve, 0.70) == 2  # reaching the target exactly counts
    assert epochs_to_reach(curve, 0.70 + 1e-12) == 2  # ... up to float noise
    assert epochs_to_reach(curve, 0.80) == 4  # epoch 3 (0.60) spent, but it did not raise the best
    assert epochs_to_reach(curve, 0.95) is None
    assert epochs_to_reach(best_so_far([]), 0.0) is None


def test_median_interval_treats_repeats_that_never_reached_the_target_as_larger_than_any():
    median, low, high = median_interval([10, 12, 14, 16, 18])
    assert median == 14 and 10 <= low <= 14 <= high <= 18
    assert median_interval([7, 7, 7]) == (7, 7, 7)
    median, low, high = median_interval([10, 12, 14, math.inf, math.inf])  # 3 of 5 reached: the median is finite
    assert median == 14 and low >= 10 and high == math.inf  # ...but resamples with 3 misses exist: no upper bound
    assert median_interval([10, math.inf, math.inf])[0] == math.inf  # most never reached: neither did the median


def test_summary_of_repeats_has_bands_and_the_epochs_to_target_over_random_budget():
    runs = [{"best_so_far": [0.5, 0.7, 0.8], "seconds": [1.0, 2.0, 3.0], "trial_epochs": 3, "best_val_accuracy": 0.8,
             "wall_seconds": 4.0, "epochs_to_target": 2},
            {"best_so_far": [0.6, 0.6], "seconds": [2.0, 5.0], "trial_epochs": 2, "best_val_accuracy": 0.6,
             "wall_seconds": 6.0, "epochs_to_target": None}]
    summary = summarize(runs, target=0.7, budget=4)
    assert summary["repeats"] == 2 and summary["final_best_val_accuracy"]["mean"] == pytest.approx(0.7)
    low, high = summary["final_best_val_accuracy"]["ci95"]
    assert low < 0.6 and high > 0.8  # two repeats: a wide t interval
    assert summary["epochs_to_target"]["reached"] == 1 and summary["epochs_to_target"]["ci95"][0] == 2
    curve = summary["curve"]
    assert curve["trial_epochs"] == [1, 2, 3]
    assert curve["mean"] == pytest.approx([0.55, 0.65, 0.7])  # the shorter search keeps its best (0.6) at epoch 3
    assert all(lo <= m <= hi for lo, m, hi in zip(curve["low"], curve["mean"], curve["high"]))
    wall = summary["wall_curve"]  # from 2 s, when both had reported: at 2 s 0.7 and 0.6, at 5 s 0.8 and 0.6
    assert wall["seconds"][0] == 2.0 and wall["mean"][0] == pytest.approx(0.65) and wall["mean"][-1] == 0.7
    fraction = summary["fraction_of_random_budget"]
    assert fraction["median"] is None and fraction["ci95"][1] is None  # half the repeats never reached it


def test_search_figures_of_a_finished_experiment_folder(tmp_path):
    """Two trials with Ray result files (one cut short by a kill) and a failed trial without any."""
    experiment = tmp_path / "experiment"
    reports = {
        "a": [{"timestamp": 1002, "epoch": 1, "val_accuracy": 0.5, "time_total_s": 2.5},
              {"timestamp": 1004, "epoch": 2, "val_accuracy": 0.6, "time_total_s": 4.0}],
        "b": [{"timestamp": 1003, "epoch": 1, "val_accuracy": 0.8, "time_total_s": 3.0}],
    }
    for trial, lines in reports.items():
        (experiment / trial).mkdir(parents=True)
        (experiment / trial / layout.RAY_RESULT).write_text("".join(json.dumps(r) + "\n" for r in lines))
    with (experiment / "a" / layout.RAY_RESULT).open("a") as killed:
        killed.write('{"timestamp": 10')
    pd.DataFrame({"path": [str(experiment / t) for t in ("a", "b", "c")], "train_seconds": [3.0, 1.0, 0.0],
                  "epochs": [2, 1, 0], "best_val_accuracy": [0.6, 0.8, float("nan")]}
                 ).to_csv(experiment / layout.TRIALS, index=False)
    (experiment / layout.BEST).write_text(json.dumps({"wall_seconds": 10.0}))
    (experiment / layout.SEARCH_OPTIONS).write_text("{}")
    os.utime(experiment / layout.SEARCH_OPTIONS, (999.0, 999.0))  # the tuner started at t = 999 s

    figures = search_figures(experiment, concurrency=2)
    assert figures["trials"] == 3 and figures["trial_epochs"] == 3 and figures["best_val_accuracy"] == 0.8
    assert figures["wall_seconds"] == 10.0 and figures["train_seconds"] == 4.0 and figures["concurrency"] == 2
    assert figures["overhead_share"] == pytest.approx(1 - 4.0 / (10.0 * 2))  # slot-seconds outside epochs
    assert figures["in_trial_overhead_seconds"] == pytest.approx(((4.0 - 3.0) + (3.0 - 1.0)) / 2)
    assert figures["first_trial_start_seconds"] == pytest.approx((1002 - 2.5) - 999.0)
    assert figures["events"] == [(1002, 1, 0.5), (1003, 1, 0.8), (1004, 2, 0.6)]  # all trials, in time order
    # No pid in these reports. Surely running: a from 1000.5 to 1004 s, b from 1001 to 1003 s: both at once.
    assert figures["processes"] == 0 and figures["most_trials_at_once"] == 2 and figures["errored_trials"] is None
    assert figures["devices"] == []  # nor a device
    assert epochs_to_reach(best_so_far([e[2] for e in figures["events"]]), 0.8) == 2

    saved = saved_and_read_back(figures, tmp_path / "search.json")
    assert saved["events"] == [[1002, 1, 0.5], [1003, 1, 0.8], [1004, 2, 0.6]]
    assert {k: v for k, v in saved.items() if k != "events"} == {k: v for k, v in figures.items() if k != "events"}


def test_bench_search_describes_the_trials_devices_on_a_driver_without_a_gpu(tmp_path):
    """Searches whose trials ran on GPU nodes, read on a driver that has no GPU (torch here sees none)."""
    for strategy, gpu in (("random+fifo-r0", "NVIDIA H200"), ("tpe+asha-r0", "NVIDIA A100")):
        (tmp_path / strategy / "trial_a").mkdir(parents=True)
        (tmp_path / strategy / layout.SEARCH_OPTIONS).write_text(json.dumps({"gpus_per_trial": 0.5}))
        report = {"epoch": 1, "val_accuracy": 0.5, "device": "cuda:0", "gpu_name": gpu}
        (tmp_path / strategy / "trial_a" / layout.RAY_RESULT).write_text(json.dumps(report) + "\n")
    env = search_environment(tmp_path)
    assert env["trial_devices"] == ["cuda:0 (NVIDIA A100)", "cuda:0 (NVIDIA H200)"]
    assert env["device"] == "cpu" and set(env) == ENVIRONMENT | {"trial_devices"}  # the driver's own


def test_most_at_once_counts_overlapping_spans_and_not_touching_ones():
    assert most_at_once([]) == 0
    assert most_at_once([(0, 10), (1, 2), (3, 4), (3.5, 5)]) == 3  # (0, 10), (3, 4) and (3.5, 5) at t = 3.7
    assert most_at_once([(0, 1), (1, 2), (2, 3)]) == 1  # one ends as the next starts: one after another
    assert most_at_once([(0, 5), (2.5, 2)]) == 1  # a trial shorter than the timestamps' second: not surely running


def test_interleaved_runs_take_turns_round_by_round():
    calls = []

    def run(name):
        def one_round(number):
            calls.append((name, number))
            return {"images": 10, "seconds": 1.0, "round": number}
        return one_round

    results = interleaved({"a": run("a"), "b": run("b")}, rounds=3)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert [r["round"] for r in results["a"]] == [0, 1, 2] and len(results["b"]) == 3


def test_ratio_spread_is_the_median_of_the_rounds_ratios_with_their_range():
    ours = [{"images": 100, "seconds": 1.0}, {"images": 100, "seconds": 4.0}, {"images": 50, "seconds": 1.0}]
    theirs = [{"images": 10, "seconds": 1.0}, {"images": 10, "seconds": 1.0}, {"images": 10, "seconds": 2.0}]
    spread = ratio_spread(ours, theirs)
    assert spread["rounds"] == pytest.approx([10.0, 2.5, 10.0])  # round 2: the other process slowed ours
    assert (spread["median"], spread["min"], spread["max"]) == pytest.approx((10.0, 2.5, 10.0))
    assert rate(ours) == pytest.approx(250 / 6.0)  # images over seconds of all rounds
    assert ratio_spread(ours[:2], theirs[:2])["median"] == pytest.approx((10.0 + 2.5) / 2)  # even count: the mean


def test_split_evenly_spreads_steps_over_rounds():
    assert split_evenly(100, 5) == [20] * 5
    assert split_evenly(7, 3) == [3, 2, 2]
    assert split_evenly(2, 5) == [1, 1]  # never an empty round
    assert split_evenly(1, 1) == [1]


def test_loader_epochs_take_turns_and_the_first_round_is_left_out():
    order = []

    def pipeline(name: str, pause_s: float):
        def epoch_batches(epoch: int):
            order.append((name, epoch))
            if epoch == 0:  # a warm-up epoch: many images at once; counted, they would dominate the rate
                yield None, torch.zeros(1000)
                return
            time.sleep(pause_s)
            yield None, torch.zeros(2)
        return epoch_batches

    rounds = timed_epochs_in_turns({"fast": pipeline("fast", 0.0), "slow": pipeline("slow", 0.2)}, 3, CPU)
    assert order == [("fast", 0), ("slow", 0), ("fast", 1), ("slow", 1), ("fast", 2), ("slow", 2)]
    assert set(rounds) == {"fast", "slow"} and all(len(r) == 2 for r in rounds.values())
    assert [r["images"] for r in rounds["slow"]] == [2, 2]  # the warm-up's 1000 left out
    assert all(r["seconds"] >= 0.2 for r in rounds["slow"])
    assert ratio_spread(rounds["fast"], rounds["slow"])["min"] > 1


# ---------------------------------------------------------------- the benchmarks, once each at the smallest size


def test_bad_settings_are_refused_before_any_work(demo_dir, tmp_path):
    with pytest.raises(GalaxyTuneError, match="--epochs 1: use 2 or more"):
        bench_loader(demo_dir, tmp_path, epochs=1)
    with pytest.raises(GalaxyTuneError, match="--method 'dora': choose full or lora"):
        bench_train(demo_dir, tmp_path, method="dora")
    with pytest.raises(GalaxyTuneError, match="--method 'lora' 'lora'"):
        bench_train(demo_dir, tmp_path, method=["lora", "lora"])
    with pytest.raises(GalaxyTuneError, match="--rounds 0 must be 1 or more"):
        bench_train(demo_dir, tmp_path, rounds=0, device="cpu")
    with pytest.raises(GalaxyTuneError, match="--eval-batches -1 must be 0 or more"):
        bench_train(demo_dir, tmp_path, eval_batches=-1, device="cpu")
    with pytest.raises(GalaxyTuneError, match="--lora-batchnorm 'none': choose frozen, stats, affine"):
        bench_train(demo_dir, tmp_path, method="lora", lora_batchnorm="none")
    assert not (tmp_path / "bench").exists() and not (tmp_path / "prepared").exists()


def test_bench_loader_figures(demo_dir, tmp_path, capsys):
    figures = bench_loader(demo_dir, tmp_path, image_size_px=IMAGE_SIZE_PX, batch_size=16, crop_px=CROP_PX,
                           epochs=4, threads=1, device="cpu")
    assert set(figures) == {
        "benchmark", "settings", "galaxy_tune_images_per_s", "reference_images_per_s", "speedup", "speedup_range",
        "speedup_per_round", "cache_build_seconds", "cache_build_images", "cache_build_images_per_s", "cache_mb",
        "batch_float_mb", "readers", "max_private_mb_per_reader", "private_to_cache_ratio", "environment"}
    assert figures["benchmark"] == "loader" and set(figures["environment"]) == ENVIRONMENT
    settings = figures["settings"]
    assert settings["torch_threads"] == 1 and settings["image_size_px"] == IMAGE_SIZE_PX
    assert settings["device"] == "cpu" and settings["data_dir"] == str(demo_dir)
    ratios = figures["speedup_per_round"]  # epochs 2-4 of each pipeline, in turns: 3 rounds
    assert len(ratios) == 3 and figures["speedup"] == sorted(ratios)[1]
    assert figures["speedup_range"] == [min(ratios), max(ratios)]
    cached = figures["cache_build_images"]  # the task's galaxies of the 120
    assert 0 < settings["train_images"] < cached <= 120
    assert figures["cache_build_images_per_s"] == pytest.approx(
        figures["cache_build_images"] / figures["cache_build_seconds"])
    pixel_bytes = cached * 3 * IMAGE_SIZE_PX**2  # uint8, plus the .npy header
    assert pixel_bytes <= figures["cache_mb"] * MB < pixel_bytes + 4096
    assert figures["batch_float_mb"] == pytest.approx(16 * 3 * IMAGE_SIZE_PX**2 * 4 / MB)
    # Two processes read the cache at once: they share its pages instead of each holding a copy.
    assert len(figures["readers"]) == 2
    for reader in figures["readers"]:
        assert set(reader) == {"private_mb", "peak_working_mb", "cache_mapped_mb", "cache_shared_mb",
                               "cache_private_mb"}
        assert 0 < reader["cache_mapped_mb"] < figures["cache_mb"] + 4096 / MB and reader["cache_private_mb"] == 0
    worst = max(r["private_mb"] for r in figures["readers"])
    assert figures["max_private_mb_per_reader"] == worst
    assert figures["private_to_cache_ratio"] == pytest.approx(worst / figures["cache_mb"])
    assert "speed-up" in capsys.readouterr().out
    assert not list((tmp_path / "bench").iterdir())  # the scratch cache is gone

    assert saved_and_read_back(figures, tmp_path / "loader.json") == figures


def test_bench_train_compares_full_and_lora_in_one_run(demo_dir, tmp_path, capsys):
    figures = bench_train(demo_dir, tmp_path, model="tiny", image_size_px=IMAGE_SIZE_PX, crop_px=CROP_PX,
                          batch_size=8, method=["full", "lora"], steps=3, rounds=2, device="cpu")
    out = capsys.readouterr().out

    settings = figures["settings"]
    assert settings["methods"] == ["full", "lora"] and settings["steps_per_round"] == [2, 1]
    assert (settings["warmup"], settings["eval_batches"], settings["eval_batch_size"]) == (1, 2, 64)  # CPU defaults
    assert settings["compiled"] is None and settings["precision"] == "fp32" and settings["lora_rank"] == 8
    assert settings["lora_batchnorm"] == "stats"  # the reference recipe's
    full, lora = figures["methods"]["full"], figures["methods"]["lora"]
    common = {"train_images_per_s", "train_images_per_s_per_round", "peak_memory_mb", "state_mb", "peak_working_mb",
              "eval_images_per_s"}
    assert set(full) == common
    assert set(lora) == common | {"eval_branch_images_per_s", "merged_to_branch_eval", "merged_max_abs_diff",
                                  "merged_relative_diff", "merged_matches_branch", "lora_artifact_bytes",
                                  "lora_to_full_checkpoint_ratio"}
    for method in (full, lora):
        assert len(method["train_images_per_s_per_round"]) == 2
        assert method["peak_memory_mb"] == pytest.approx(method["state_mb"] + method["peak_working_mb"])
    # Full fine-tuning holds gradients and AdamW state for every weight; LoRA for its adapters and head only.
    assert lora["state_mb"] < full["state_mb"]
    speed = figures["lora_to_full"]["train_speed"]
    per_round = [b / a for a, b in zip(full["train_images_per_s_per_round"], lora["train_images_per_s_per_round"])]
    assert speed["rounds"] == pytest.approx(per_round) and speed["min"] <= speed["median"] <= speed["max"]
    assert figures["lora_to_full"]["peak_memory_ratio"] == pytest.approx(
        lora["peak_memory_mb"] / full["peak_memory_mb"])
    assert lora["merged_matches_branch"] is True and lora["merged_relative_diff"] <= 1e-4  # float rounding
    assert len(lora["merged_to_branch_eval"]["rounds"]) == 2

    # The full checkpoint is the plain model's: the tensors full fine-tuning saves; LoRA's artefact a fraction.
    model_bytes = sum(t.numel() * t.element_size() for t in full_state_dict(figures))
    assert model_bytes <= figures["full_checkpoint_bytes"] < model_bytes + 64 * 1024
    assert 0 < lora["lora_artifact_bytes"] < figures["full_checkpoint_bytes"]
    assert lora["lora_to_full_checkpoint_ratio"] == pytest.approx(
        lora["lora_artifact_bytes"] / figures["full_checkpoint_bytes"])
    assert "memory_measure" in figures and set(figures["environment"]) == ENVIRONMENT
    assert saved_and_read_back(figures, tmp_path / "train.json") == figures
    assert "LoRA / full train images/s" in out and "merged outputs = branch" in out


def test_bench_train_of_one_method_has_no_comparison_and_can_skip_eval(demo_dir, tmp_path):
    figures = bench_train(demo_dir, tmp_path, model="tiny", image_size_px=IMAGE_SIZE_PX, crop_px=CROP_PX,
                          batch_size=8, method="full", steps=1, warmup=0, eval_batches=0, device="cpu")
    assert list(figures["methods"]) == ["full"] and figures["lora_to_full"] is None
    assert figures["methods"]["full"]["eval_images_per_s"] is None
    assert figures["settings"]["lora_rank"] is None and figures["settings"]["steps_per_round"] == [1]


def test_bench_train_command_measures_lora_with_a_frozen_batchnorm(demo_dir, tmp_path, capsys):
    assert cli.main(["bench", "train", "--data-dir", str(demo_dir), "--results-dir", str(tmp_path), "--model", "tiny",
                     "--image-size", str(IMAGE_SIZE_PX), "--crop", str(CROP_PX), "--batch-size", "8",
                     "--method", "lora", "--lora-batchnorm", "frozen", "--steps", "1", "--warmup", "0",
                     "--eval-batches", "0", "--device", "cpu", "--json", str(tmp_path / "train.json")]) == 0
    figures = json.loads((tmp_path / "train.json").read_text())
    assert figures["settings"]["lora_batchnorm"] == "frozen" and list(figures["methods"]) == ["lora"]
    assert "(LoRA rank 8, BatchNorm frozen)" in capsys.readouterr().out


def full_state_dict(figures: dict) -> list[torch.Tensor]:
    from galaxy_tune.train import REFERENCE_CONFIGS, make_model

    model = make_model(REFERENCE_CONFIGS["full"], figures["settings"]["model"], num_labels=2)
    return list(model.state_dict().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_train_on_cuda_uses_bf16_channels_last_and_compile(demo_dir, tmp_path):
    figures = bench_train(demo_dir, tmp_path, model="tiny", image_size_px=32, crop_px=CROP_PX, batch_size=16,
                          method=["full", "lora"], steps=3, warmup=2, device="cuda", compile_model=True)
    assert figures["settings"]["precision"] == training_precision(torch.device("cuda"))  # bf16 from Ampere on
    assert figures["settings"]["channels_last"]
    assert figures["settings"]["compiled"] == "inductor"
    assert figures["memory_measure"].startswith("torch.cuda.max_memory_allocated")
    assert figures["methods"]["lora"]["peak_memory_mb"] > 0 and figures["methods"]["lora"]["merged_matches_branch"]


# Every sampler and every scheduler once, the baseline first, as `bench search --strategies` takes them.
EVERY_PART = ["random+fifo", "tpe-independent+asha", "tpe+hyperband"]


def test_bench_search_runs_every_strategy_repeatedly_and_summarises_them(ray_local, demo_dir, s3_server, tmp_path):
    assert {s.partition("+")[0] for s in EVERY_PART} == set(SAMPLERS)
    assert {s.partition("+")[2] for s in EVERY_PART} == set(SCHEDULERS) and set(EVERY_PART) <= set(STRATEGIES)
    uri = s3_uri(s3_server.endpoint, prefix="bench")  # each search's results there, as `search --storage` keeps them
    figures = bench_search(demo_dir, tmp_path, model="tiny", num_samples=2, max_epochs=2, repeats=2,
                           image_size_px=IMAGE_SIZE_PX, crop_px=CROP_PX, device="cpu", gpus_per_trial=0,
                           strategies=EVERY_PART, storage=uri)
    assert set(figures) == {"benchmark", "settings", "baseline", "target_val_accuracy", "random_trial_epochs",
                            "strategies", "ray_start_seconds", "model_build_seconds", "data_open_seconds",
                            "environment", "figure"}
    settings = figures["settings"]
    stored = object_storage(settings["storage"])
    assert settings["repeats"] == 2 and settings["strategies"] == EVERY_PART and settings["concurrency"] == 2
    assert settings["device"] == "cpu" and settings["gpus_per_trial"] == 0
    assert list(figures["strategies"]) == EVERY_PART and figures["baseline"] == "random+fifo"
    random = figures["strategies"]["random+fifo"]
    assert figures["random_trial_epochs"] == 4  # 2 trials x 2 epochs, none stopped
    assert figures["target_val_accuracy"] == pytest.approx(
        sum(r["best_val_accuracy"] for r in random["runs"]) / 2 - 0.01)
    for name, strategy in figures["strategies"].items():
        sampler, scheduler = name.split("+")
        assert (strategy["sampler"], strategy["scheduler"]) == (sampler, scheduler)
        runs = strategy["runs"]
        assert [r["sampler_seed"] for r in runs] == [0, 1]  # the same split and training seed, other proposals
        for run in runs:
            assert run["trials"] == 2 and run["errored_trials"] == 0
            assert len(run["best_so_far"]) == len(run["seconds"]) == run["trial_epochs"] <= 4
            assert run["best_so_far"][-1] == pytest.approx(run["best_val_accuracy"], abs=1e-6)  # trials.csv: 6 digits
            assert run["epochs_to_target"] == epochs_to_reach(run["best_so_far"], figures["target_val_accuracy"])
            searched = json.loads((Path(run["experiment"]) / "search.json").read_text())
            assert searched["storage"] == sub_uri(uri, Path(settings["experiments"]).name) == settings["storage"]
            with stored.filesystem.open_input_stream(stored.path(Path(run["experiment"]).name, "trials.csv")) as up:
                assert up.read() == (Path(run["experiment"]) / "trials.csv").read_bytes()
            assert (searched["sampler"], searched["scheduler"], searched["concurrency"]) == (sampler, scheduler, 2)
            assert searched["constant_liar"] is (sampler == "tpe")
            if scheduler == "fifo":
                assert run["trial_epochs"] == 4 and run["stopped_trials"] == 0
        summary = strategy["summary"]
        assert summary["repeats"] == 2 and summary["epochs_to_target"]["reached"] == sum(
            r["epochs_to_target"] is not None for r in runs)
        assert len(summary["curve"]["mean"]) == max(r["trial_epochs"] for r in runs)
    # Random search reaches its own mean best - 1 point in the repeat that found the better config, at least.
    assert figures["strategies"]["random+fifo"]["summary"]["epochs_to_target"]["reached"] >= 1
    folder = Path(settings["experiments"])
    assert json.loads((folder / "search_bench.json").read_text()) == json.loads(json.dumps(figures))
    assert Path(figures["figure"]).stat().st_size > 10_000
    assert figures["environment"]["trial_devices"] == ["cpu"]
    assert figures["ray_start_seconds"] is None  # the test's Ray was already running, and is left running
    assert ray_local.is_initialized()


@pytest.mark.parametrize("strategies, culprit", [
    (["tpe+asha"], "including random+fifo"), (["random+fifo", "tpe+pbt"], "tpe+pbt"),
    (["random+fifo", "random+fifo"], "distinct")])
def test_bench_search_refuses_unknown_or_baseline_less_strategies(tmp_path, strategies, culprit):
    with pytest.raises(GalaxyTuneError, match=re.escape(culprit)):
        bench_search(tmp_path / "no-data", tmp_path, strategies=strategies)
    assert not (tmp_path / "bench").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_gpu_refuses_to_run_without_a_gpu(tmp_path, capsys):
    assert cli.main(["bench", "gpu", "--results-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "bench gpu needs a CUDA GPU and torch sees none" in error and "--dry-run" in error
    assert not (tmp_path / "bench").exists()


def test_bench_gpu_dry_run_runs_every_check_on_the_cpu(ray_local, tmp_path, capsys):
    assert cli.main(["bench", "gpu", "--dry-run", "--results-dir", str(tmp_path), "--json",
                     str(tmp_path / "gpu.json")]) == 0
    out = capsys.readouterr().out
    figures = json.loads((tmp_path / "gpu.json").read_text())
    folder = tmp_path / "bench" / os.path.basename(figures["folder"])
    assert json.loads((folder / "gpu.json").read_text()) == figures
    assert figures["dry_run"] is True and figures["environment"]["device"] == "cpu"
    assert figures["precision"] == "fp32" and "training in fp32" in out  # bf16 autocast only on a GPU that has it
    assert (folder / "demo-data" / "training_solutions_rev1.csv").is_file()  # demo data made on the spot

    checks = figures["checks"]
    assert list(checks) == ["training", "compile", "gradients", "lora_bf16", "lora_sum", "resume", "votes", "search",
                            "retrain_predict"]
    for name, check in checks.items():
        assert "error" not in check, f"{name}: {check.get('error')}"
        assert {"passed", "summary", "seconds"} <= set(check)
        assert ("target" in check) == (check["passed"] is not None or name == "training")
    training = checks["training"]
    assert training["passed"] is None  # no speed target on a dry run
    assert training["full_images_per_s"] > 0 and training["lora_images_per_s"] > 0
    assert training["lora_to_full"] == training["bench_train"]["lora_to_full"]["train_speed"]["median"]
    assert training["peak_memory_ratio"] > 0
    frozen = training["bench_train_frozen_batchnorm"]
    assert frozen["settings"]["lora_batchnorm"] == "frozen" and training["bench_train"]["settings"]["lora_batchnorm"] \
        == "stats"
    assert training["frozen_batchnorm_lora_to_full"] == frozen["lora_to_full"]["train_speed"]["median"] > 0
    compiled = checks["compile"]  # full and LoRA, each against itself uncompiled, in turns
    assert compiled["passed"] is True and compiled["backend"] == "eager"
    assert set(compiled["images_per_s"]) == {"full", "full_compiled", "lora", "lora_compiled"}
    assert compiled["speedup"]["full"] > 0 and compiled["speedup"]["lora"] > 0
    assert max(compiled["loss_relative_difference"].values()) <= 1e-5  # the same weights, the same batch
    gradients = checks["gradients"]  # the training path against fp32: the same on the CPU, which trains in fp32
    assert gradients["passed"] is True and max(gradients["gradient_error"].values()) < 1e-6
    bf16 = checks["lora_bf16"]  # CPU bf16 arithmetic: the roundings a GPU's bf16 makes too
    assert bf16["passed"] is True and bf16["branch_error"] < 0.01 < 0.5 < min(bf16["merged_error"],
                                                                              bf16["cast_sum_error"])
    lora_sum = checks["lora_sum"]
    assert lora_sum["passed"] is None and set(lora_sum["images_per_s"]) == {"fp32", "autocast"}
    assert lora_sum["cast_to_fp32_speed"]["median"] > 0 and lora_sum["cast_to_fp32_memory"] > 0
    resume = checks["resume"]  # deterministic on the CPU
    assert resume["passed"] is True and max(resume["relative_difference"].values()) <= 1e-5
    votes = checks["votes"]
    assert votes["passed"] is True and votes["outputs"] == 37 and votes["gradient_error"] < 1e-6
    assert len(votes["val_rmse"]) == 2 and 0 < votes["constant_predictor_val_rmse"] < 1
    search = checks["search"]
    assert search["passed"] is True and search["trials"] == 4 and search["errored_trials"] == 0
    assert search["gpus_per_trial"] == 0 and search["cpus_per_trial"] == 1  # 2 at once on the test's 2 CPUs
    assert search["devices"] == ["cpu"] and 0 <= search["stopped_trials"] < 4
    assert 1 <= search["processes"] <= 4 and 0 <= search["most_trials_at_once"] <= 2  # trials under a second
    agreement = checks["retrain_predict"]
    assert agreement["passed"] is True and agreement["galaxies"] > 0 and agreement["max_abs_prob_diff"] <= 1e-4
    assert figures["passed"] is True
