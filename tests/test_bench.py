"""`bench loader|train|search` run on tiny inputs and report well-formed figures (never a speed target)."""

import json

import pytest
import torch
from conftest import CROP_PX

from galaxy_tune.bench import bench_loader, bench_search, bench_train, write_json


def test_bench_loader_compares_the_cache_with_the_reference_pipeline(demo_dir, tmp_path, capsys):
    figures = bench_loader(demo_dir, tmp_path, image_size_px=16, batch_size=16, crop_px=CROP_PX, threads=1)
    assert figures["galaxy_tune_images_per_s"] > 0 and figures["reference_images_per_s"] > 0
    assert figures["speedup"] == pytest.approx(figures["galaxy_tune_images_per_s"] / figures["reference_images_per_s"])
    assert figures["cache_build_seconds"] > 0 and 0 < figures["cache_build_images"] <= 120
    assert figures["settings"]["torch_threads"] == 1
    # Two processes read the cache at once: they share its pages instead of each holding a copy.
    assert len(figures["readers"]) == 2
    for reader in figures["readers"]:
        assert reader["cache_mapped_mb"] > 0
        assert reader["cache_private_mb"] == 0
    assert "speed-up" in capsys.readouterr().out
    assert not (tmp_path / "bench").exists() or not list((tmp_path / "bench").iterdir())  # the scratch cache is gone

    write_json(figures, tmp_path / "loader.json")
    assert json.loads((tmp_path / "loader.json").read_text())["speedup"] == pytest.approx(figures["speedup"])


def test_bench_train_full_reports_rates_memory_and_checkpoint_size(demo_dir, tmp_path):
    figures = bench_train(demo_dir, tmp_path, model="tiny", image_size_px=16, crop_px=CROP_PX, batch_size=8,
                          method="full", steps=2, warmup=1, device="cpu")
    assert figures["train_images_per_s"] > 0 and figures["eval_images_per_s"] > 0
    assert figures["peak_memory_mb"] > 0 and figures["full_checkpoint_bytes"] > 0
    assert figures["settings"]["compiled"] is False and figures["settings"]["bf16_autocast"] is False


def test_bench_train_lora_merged_outputs_equal_unmerged_and_adapters_are_small(demo_dir, tmp_path, capsys):
    figures = bench_train(demo_dir, tmp_path, model="tiny", image_size_px=16, crop_px=CROP_PX, batch_size=8,
                          method="lora", steps=2, warmup=1, device="cpu", compile_model=True)
    assert figures["merged_matches_unmerged"] is True
    assert figures["merged_speedup"] == pytest.approx(
        figures["eval_merged_images_per_s"] / figures["eval_unmerged_images_per_s"])
    assert 0 < figures["lora_artifact_bytes"] < figures["full_checkpoint_bytes"]
    assert figures["lora_to_full_checkpoint_ratio"] == pytest.approx(
        figures["lora_artifact_bytes"] / figures["full_checkpoint_bytes"])
    assert figures["settings"]["compiled"] is False  # --compile is a CUDA-only option
    assert "merged outputs = unmerged" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_train_on_cuda_uses_bf16_channels_last_and_compile(demo_dir, tmp_path):
    figures = bench_train(demo_dir, tmp_path, model="tiny", image_size_px=32, crop_px=CROP_PX, batch_size=16,
                          method="lora", steps=3, warmup=2, device="cuda", compile_model=True)
    assert figures["settings"]["bf16_autocast"] and figures["settings"]["channels_last"]
    assert figures["settings"]["compiled"] and figures["memory_measure"] == "torch.cuda.max_memory_allocated"
    assert figures["peak_memory_mb"] > 0 and figures["merged_matches_unmerged"] is True


def test_bench_search_compares_asha_tpe_with_full_budget_random_search(ray_local, demo_dir, tmp_path):
    figures = bench_search(demo_dir, tmp_path, num_samples=2, max_epochs=2, image_size_px=16)
    asha, random = figures["asha_tpe"], figures["random"]
    assert random["trial_epochs"] == 2 * 2  # every random trial runs the full budget
    assert 2 <= asha["trial_epochs"] <= 4
    assert figures["epochs_ratio"] == pytest.approx(asha["trial_epochs"] / random["trial_epochs"])
    assert figures["target_val_accuracy"] == pytest.approx(random["best_val_accuracy"] - 0.01)
    assert 1 <= random["epochs_to_target"] <= random["trial_epochs"]
    for search in (asha, random):
        assert 0 <= search["best_val_accuracy"] <= 1
        assert 0 <= search["overhead_share"] < 1 and search["train_seconds"] > 0
    assert figures["ray_start_seconds"] is None  # the test's Ray was already running, and is left running
    assert ray_local.is_initialized()

    write_json(figures, tmp_path / "search.json")
    assert json.loads((tmp_path / "search.json").read_text())["random"]["trial_epochs"] == 4
