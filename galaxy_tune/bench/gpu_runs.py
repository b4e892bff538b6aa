"""`bench gpu`'s checks of whole runs on the device: a checkpoint resumed onto it, the kaggle-votes task, LoRA trials
sharing it in a search, and `retrain` then `predict`."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import torch

from .. import layout
from ..data.pixels import image_path
from ..data.prepare import DataConfig
from ..data.tasks import get_task
from ..models.export import HF_FOLDER, MODEL_INFO
from ..train import METHODS, REFERENCE_CONFIGS, fit, make_model, pick_device
from .gpu_training import TARGETS as TRAINING_TARGETS
from .gpu_training import gradient_error, open_demo



def check_resume(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """Full and LoRA: epoch 2 resumed from epoch 1's checkpoint, saved and loaded (to the CPU) as a trial does it,
    then trained on the device, against the same epoch of an uninterrupted run."""
    device = pick_device(plan["device"])
    prepared, train, val = open_demo(plan, data_dir, folder)
    head_bias = get_task(prepared.task).head_bias(train.labels)
    differences = {}
    for method in METHODS:
        config = dataclasses.replace(REFERENCE_CONFIGS[method], epochs=2, batch_size=plan["batch_size"])
        saved = folder / f"checkpoint-{method}.pt"

        def save_epoch_1(metrics: dict, state) -> None:
            if metrics["epoch"] == 1:
                torch.save(state(), saved)

        def model():
            return make_model(config, plan["model"], num_labels=len(prepared.class_names), head_bias=head_bias)

        straight = fit(model(), config, train, val, device, on_epoch=save_epoch_1)[-1]
        start = torch.load(saved, weights_only=True, map_location="cpu")
        resumed = fit(model(), config, train, val, device, start=start)[-1]
        differences[method] = max(abs(resumed[k] - straight[k]) / abs(straight[k]) for k in ("train_loss", "val_loss"))
    tolerance = plan["resume_tolerance"]
    return {"relative_difference": differences, "target": f"epoch 2's losses within {tolerance:g} (relative)",
            "passed": all(d <= tolerance for d in differences.values()),
            "summary": f"resumed at epoch 2 vs uninterrupted, largest relative loss difference: full "
                       f"{differences['full']:.1g}, LoRA {differences['lora']:.1g}"}


def check_votes(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """The kaggle-votes task (37 vote fractions, per-question softmax, RMSE) with LoRA: its gradients against fp32
    (`gradient_error`), then 2 epochs of training; the val RMSE next to the constant predictor's."""
    device = pick_device(plan["device"])
    prepared, train, val = open_demo(plan, data_dir, folder, task="kaggle-votes")
    task = get_task(prepared.task)
    config = dataclasses.replace(REFERENCE_CONFIGS["lora"], epochs=2, batch_size=plan["batch_size"])
    error = gradient_error(config, plan["model"], prepared, train, device)
    model = make_model(config, plan["model"], num_labels=len(prepared.class_names),
                       head_bias=task.head_bias(train.labels))
    rmse = [epoch["val_rmse"] for epoch in fit(model, config, train, val, device)]
    baseline = task.baseline(train.labels, val.labels)
    bound = TRAINING_TARGETS["gradient_error"]
    return {"outputs": len(prepared.class_names), "gradient_error": error, "val_rmse": rmse,
            "constant_predictor_val_rmse": baseline,
            "target": f"gradients within {bound:.0%} of fp32, a finite val RMSE",
            "passed": error < bound and all(math.isfinite(r) for r in rmse),
            "summary": f"{len(prepared.class_names)} outputs: gradients vs fp32 {error:.2%} off; val RMSE "
                       f"{' -> '.join(f'{r:.4f}' for r in rmse)} (constant predictor {baseline:.4f})"}


def check_search(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """8 LoRA trials sharing the GPU, 4 at once (0.25 GPU each), ASHA stopping the weaker: none failed (e.g. out of
    memory, or a device without an index), trials ran at once, some stopped, workers reused, each on its GPU.

    The dry run's 4 trials, 2 at once, share the CPUs and last under a second: there only the failures count."""
    import ray

    from ..search.cluster import start_ray
    from ..search.options import SearchOptions
    from ..search.run import run_search
    from .searching import search_figures

    trials, at_once = plan["search_trials"], plan["search_at_once"]
    started_ray = not ray.is_initialized()
    start_ray(None)
    try:  # as many CPUs per trial as lets `at_once` trials run at once, at most 1
        cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / at_once)
        data = DataConfig(data_dir, image_size_px=plan["image_size_px"], crop_px=plan["crop_px"])
        experiment = run_search(SearchOptions(
            "lora", data, results_dir=folder / "searches", name="shared-gpu", num_samples=trials,
            max_epochs=plan["search_epochs"], model=plan["model"], cpus_per_trial=cpus,
            gpus_per_trial=plan["gpus_per_trial"], device=plan["device"], max_concurrent=at_once, scheduler="asha"))
    finally:
        if started_ray:
            ray.shutdown()
    figures = search_figures(experiment, at_once)
    processes, most_at_once = figures["processes"], figures["most_trials_at_once"]
    errored, stopped = figures["errored_trials"], figures["stopped_trials"]
    devices = figures["devices"]
    share = f"{plan['gpus_per_trial']:g} GPU" if plan["gpus_per_trial"] else f"{cpus:g} CPU, no GPU"
    return {"trials": figures["trials"], "processes": processes, "most_trials_at_once": most_at_once,
            "errored_trials": errored, "stopped_trials": stopped, "devices": devices,
            "gpus_per_trial": plan["gpus_per_trial"], "cpus_per_trial": cpus,
            "wall_seconds": figures["wall_seconds"], "experiment": str(experiment),
            "target": f"{trials} trials, none errored" + ("" if dry_run else f" (e.g. out of memory), {at_once} at "
                                                          "once, some stopped, fewer processes than trials, on cuda:0"),
            "passed": figures["trials"] == trials and errored == 0 and (dry_run or (
                most_at_once == at_once and stopped > 0 and processes < trials and devices == ["cuda:0"])),
            "summary": f"{figures['trials']} LoRA trials at {share} each: {most_at_once} surely at once, {stopped} "
                       f"stopped by ASHA, {errored} errored, {processes} worker process{'es' * (processes != 1)}, on "
                       f"{', '.join(devices)}"}


def check_retrain_predict(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """`retrain` LoRA for one epoch, then `predict` the test galaxies' JPEGs with the exported model: each galaxy's
    class-1 probability against the retrain's test (pixel cache, LoRA model; its logits at the model's temperature)."""
    from .. import api

    out = api.retrain(folder, methods=["lora"], seeds=1, max_epochs=1, data_dir=data_dir,
                      image_size_px=plan["image_size_px"], crop_px=plan["crop_px"], model=plan["model"],
                      device=plan["device"])
    tested = pd.read_csv(out / layout.TEST_PREDICTIONS)
    images = folder / "test-images"
    images.mkdir()
    for galaxy in tested["GalaxyID"]:
        shutil.copy(image_path(data_dir, galaxy), images)
    exported = out / "lora-seed0"
    table = api.predict(exported, images, folder / "predictions.csv", device=plan["device"])
    # The exported model's head holds the temperature fitted on val (if any); the retrain's test keeps its logits.
    temperature = json.loads((exported / HF_FOLDER / MODEL_INFO).read_text()).get("temperature", 1.0)
    logits = sorted(c for c in tested.columns if c.startswith("logit_"))
    tested["expected"] = (torch.softmax(torch.tensor(tested[logits].to_numpy()) / temperature, 1)[:, 1].numpy()
                          if logits else tested["prob_1"])
    both = tested.merge(table[["GalaxyID", table.columns[2]]], on="GalaxyID")  # columns: GalaxyID, class 0, 1
    difference = float((both["expected"] - both[table.columns[2]]).abs().max())
    tolerance = plan["predict_tolerance"]
    return {"galaxies": len(both), "max_abs_prob_diff": difference, "temperature": temperature, "retrain": str(out),
            "target": f"max abs difference <= {tolerance:g}", "passed": len(both) == len(tested) > 0
            and difference <= tolerance,
            "summary": f"{len(both)} test galaxies: max |retrain test - predict| of P(class 1) = {difference:.2g}"}
