"""`bench loader|train|search`: the figures' JSON structure and the definitions of their ratios (never a speed).

The ratio helpers run on hand-made inputs whose answer is known; each benchmark runs once at the smallest size.
"""

import json
import os
import time

import pandas as pd
import pytest
import torch
from conftest import CROP_PX, IMAGE_SIZE_PX

from galaxy_tune import layout
from galaxy_tune.bench import bench_loader, bench_search, bench_train, write_json
from galaxy_tune.bench.loader import rates_of_alternate_epochs
from galaxy_tune.bench.measure import MB, alternating_rates
from galaxy_tune.bench.searching import epochs_to_reach, search_figures
from galaxy_tune.errors import GalaxyTuneError

CPU = torch.device("cpu")
ENVIRONMENT = {"device", "device_name", "cpu_count", "torch_threads", "python", "torch", "torchvision", "platform",
               "measured_at"}


def saved_and_read_back(figures: dict, path) -> dict:
    write_json(figures, path)
    return json.loads(path.read_text())


# ---------------------------------------------------------------- the ratios, on hand-made inputs


def test_epochs_to_reach_counts_trial_epochs_until_the_best_so_far_reaches_the_target():
    events = [(10, 1, 0.50), (11, 1, 0.70), (12, 2, 0.60), (13, 2, 0.90)]  # (timestamp, epoch, val accuracy)
    assert epochs_to_reach(events, 0.50) == 1
    assert epochs_to_reach(events, 0.65) == 2
    assert epochs_to_reach(events, 0.70) == 2  # reaching the target exactly counts
    assert epochs_to_reach(events, 0.70 + 1e-12) == 2  # ... up to float noise
    assert epochs_to_reach(events, 0.80) == 4  # epoch 3 (0.60) spent, but it did not raise the best
    assert epochs_to_reach(events, 0.95) is None
    assert epochs_to_reach([], 0.0) is None


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
    assert epochs_to_reach(figures["events"], 0.8) == 2

    saved = saved_and_read_back(figures, tmp_path / "search.json")
    assert saved["events"] == [[1002, 1, 0.5], [1003, 1, 0.8], [1004, 2, 0.6]]
    assert {k: v for k, v in saved.items() if k != "events"} == {k: v for k, v in figures.items() if k != "events"}


def test_rates_of_alternate_epochs_take_turns_and_leave_out_the_first_epoch():
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

    rates = rates_of_alternate_epochs({"fast": pipeline("fast", 0.0), "slow": pipeline("slow", 0.02)}, 3, CPU)
    assert order == [("fast", 0), ("slow", 0), ("fast", 1), ("slow", 1), ("fast", 2), ("slow", 2)]
    assert set(rates) == {"fast", "slow"}
    assert 0 < rates["slow"] <= 2 * 2 / (2 * 0.02)  # 4 images in at least 0.04 s: the warm-up's 1000 left out


def test_alternating_rates_switch_variants_in_turns_and_time_only_the_steps_after_warm_up():
    state, calls = {}, []

    def stream():
        while True:
            yield None, torch.zeros(3)

    def step(x, y):
        calls.append(state["variant"])
        time.sleep(0.02 if state["variant"] == "slow" else 0.0)

    variants = {name: (lambda name=name: state.update(variant=name)) for name in ("fast", "slow")}
    rates = alternating_rates(variants, step, stream(), warmup=2, steps=4, device=CPU, rounds=2)
    # Each round: every variant in turn, 1 warm-up step (2 // 2 rounds) then 2 timed steps (4 // 2 rounds).
    assert calls == ["fast"] * 3 + ["slow"] * 3 + ["fast"] * 3 + ["slow"] * 3
    assert set(rates) == {"fast", "slow"}
    assert 0 < rates["slow"] <= 4 * 3 / (4 * 0.02)  # 12 timed images, each step at least 0.02 s


# ---------------------------------------------------------------- the benchmarks, once each at the smallest size


def test_bad_settings_are_refused_before_any_work(demo_dir, tmp_path):
    with pytest.raises(GalaxyTuneError, match="--epochs 1: use 2 or more"):
        bench_loader(demo_dir, tmp_path, epochs=1)
    with pytest.raises(GalaxyTuneError, match="--method 'dora'"):
        bench_train(demo_dir, tmp_path, method="dora")
    assert not (tmp_path / "bench").exists() and not (tmp_path / "prepared").exists()


def test_bench_loader_figures(demo_dir, tmp_path, capsys):
    figures = bench_loader(demo_dir, tmp_path, image_size_px=IMAGE_SIZE_PX, batch_size=16, crop_px=CROP_PX,
                           epochs=2, threads=1, device="cpu")
    assert set(figures) == {
        "benchmark", "settings", "galaxy_tune_images_per_s", "reference_images_per_s", "speedup",
        "cache_build_seconds", "cache_build_images", "cache_build_images_per_s", "cache_mb", "batch_float_mb",
        "readers", "max_private_mb_per_reader", "private_to_cache_ratio", "environment"}
    assert figures["benchmark"] == "loader" and set(figures["environment"]) == ENVIRONMENT
    settings = figures["settings"]
    assert settings["torch_threads"] == 1 and settings["image_size_px"] == IMAGE_SIZE_PX
    assert settings["device"] == "cpu" and settings["data_dir"] == str(demo_dir)
    assert figures["speedup"] == pytest.approx(figures["galaxy_tune_images_per_s"] / figures["reference_images_per_s"])
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


def test_bench_train_full_and_lora_figures(demo_dir, tmp_path, capsys):
    common = dict(model="tiny", image_size_px=IMAGE_SIZE_PX, crop_px=CROP_PX, batch_size=8, device="cpu")
    full = bench_train(demo_dir, tmp_path, method="full", **common)  # CPU defaults: 1 warm-up + 2 timed steps
    lora = bench_train(demo_dir, tmp_path, method="lora", steps=2, warmup=1, compile_model=True, **common)
    out = capsys.readouterr().out

    base = {"benchmark", "settings", "train_images_per_s", "eval_images_per_s", "peak_memory_mb", "memory_before_mb",
            "memory_measure", "full_checkpoint_bytes", "environment"}
    assert set(full) == base
    assert set(lora) == base | {"eval_merged_images_per_s", "eval_unmerged_images_per_s", "merged_speedup",
                                "merged_max_abs_diff", "merged_relative_diff", "merged_matches_unmerged",
                                "lora_artifact_bytes", "lora_to_full_checkpoint_ratio"}
    assert (full["settings"]["steps"], full["settings"]["warmup"]) == (2, 1)
    assert full["settings"]["lora_rank"] is None and lora["settings"]["lora_rank"] == 8
    for figures in (full, lora):
        assert figures["settings"]["compiled"] is False and figures["settings"]["bf16_autocast"] is False
        assert figures["memory_measure"] == "process peak RSS (VmHWM)"
        assert figures["peak_memory_mb"] >= figures["memory_before_mb"] > 0  # the peak restarts from RSS then
        assert saved_and_read_back(figures, tmp_path / "train.json") == figures
    assert "--compile applies on CUDA only" in out  # --compile is a CUDA-only option

    # The full checkpoint of a LoRA model is the plain model's: the same tensors as full fine-tuning saves.
    model_bytes = sum(t.numel() * t.element_size() for t in full_state_dict(full))
    assert model_bytes <= full["full_checkpoint_bytes"] < model_bytes + 64 * 1024
    assert lora["full_checkpoint_bytes"] == full["full_checkpoint_bytes"]
    assert 0 < lora["lora_artifact_bytes"] < lora["full_checkpoint_bytes"]
    assert lora["lora_to_full_checkpoint_ratio"] == pytest.approx(
        lora["lora_artifact_bytes"] / lora["full_checkpoint_bytes"])
    assert lora["eval_images_per_s"] == lora["eval_merged_images_per_s"]  # how eval() leaves a LoRA model
    assert lora["merged_speedup"] == pytest.approx(lora["eval_merged_images_per_s"] / lora["eval_unmerged_images_per_s"])
    assert lora["merged_matches_unmerged"] is True and lora["merged_relative_diff"] <= 1e-4
    assert "merged outputs = unmerged" in out


def full_state_dict(figures: dict) -> list[torch.Tensor]:
    from galaxy_tune.train import REFERENCE_CONFIGS, make_model

    model = make_model(REFERENCE_CONFIGS["full"], figures["settings"]["model"], num_labels=2)
    return list(model.state_dict().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_train_on_cuda_uses_bf16_channels_last_and_compile(demo_dir, tmp_path):
    figures = bench_train(demo_dir, tmp_path, model="tiny", image_size_px=32, crop_px=CROP_PX, batch_size=16,
                          method="lora", steps=3, warmup=2, device="cuda", compile_model=True)
    assert figures["settings"]["bf16_autocast"] and figures["settings"]["channels_last"]
    assert figures["settings"]["compiled"] and figures["memory_measure"] == "torch.cuda.max_memory_allocated"
    assert figures["peak_memory_mb"] > 0 and figures["merged_matches_unmerged"] is True


def test_bench_search_smoke(ray_local, demo_dir, tmp_path):
    figures = bench_search(demo_dir, tmp_path, model="tiny", num_samples=2, max_epochs=1,
                           image_size_px=IMAGE_SIZE_PX, crop_px=CROP_PX)
    assert set(figures) == {"benchmark", "settings", "asha_tpe", "random", "target_val_accuracy", "epochs_ratio",
                            "epochs_to_target_ratio", "ray_start_seconds", "model_build_seconds",
                            "data_open_seconds", "environment"}
    asha, random = figures["asha_tpe"], figures["random"]
    assert asha["trial_epochs"] == random["trial_epochs"] == 2  # 1 epoch: nothing for ASHA to stop
    assert figures["epochs_ratio"] == 1.0
    assert figures["target_val_accuracy"] == pytest.approx(random["best_val_accuracy"] - 0.01)
    assert 1 <= random["epochs_to_target"] <= 2
    for search in (asha, random):
        assert "events" not in search and search["trials"] == 2
        assert search["overhead_share"] == pytest.approx(
            1 - search["train_seconds"] / (search["wall_seconds"] * search["concurrency"]))
    assert figures["ray_start_seconds"] is None  # the test's Ray was already running, and is left running
    assert ray_local.is_initialized()
    assert saved_and_read_back(figures, tmp_path / "search.json") == figures
