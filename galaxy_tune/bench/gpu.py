"""`bench gpu`: one command that checks a GPU machine, meant to take under 8 minutes on one H100-class GPU.

On demo data generated on the spot it runs five checks with the project's own code and writes one JSON (the
figures, the environment) and a short text summary with each check against its target:
- training images/s at 224 px, full fine-tuning and LoRA side by side (`bench_train`: fit's loop, whole pipeline),
  LoRA with the reference recipe's BatchNorm and with a frozen one;
- a 4-trial search at 0.25 GPU per trial (`run_search`): 4 worker processes, running at once, none failed;
- the LoRA adapter effect under bf16 autocast against float32, as a branch and merged into the weight;
- training images/s with `torch.compile`, against the same run without;
- `retrain` then `predict` on the GPU: the exported model's probabilities against the retrain's test.

`--dry-run` runs the same code on the CPU with a tiny model and 32 px images in about a minute, so the
script can't rot unnoticed: the test suite runs it. Speed targets are not applied to a dry run.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
import traceback
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from .. import layout
from ..data.prepare import DataConfig
from ..data.demo import DEMO, DEMO_FOLDER, write_demo_data
from ..errors import GalaxyTuneError
from ..models.export import HF_FOLDER, MODEL_INFO
from ..models.lora import LoraConv2d
from ..data.pixels import image_path
from .measure import bench_dir, environment, full_precision, write_json
from .training import bench_train

# What each mode runs: the GPU check at full size, the dry run at the smallest that exercises every path.
PLANS = {
    "gpu": {"device": "cuda", "model": "resnet50-random", "num_images": DEMO["num_images"], "image_size_px": 224,
            "crop_px": None, "batch_size": 32, "train_counts": {}, "compile_backend": "inductor",
            "search_epochs": 8, "gpus_per_trial": 0.25,  # trials long enough (~10 s) to overlap despite start-up
            "predict_tolerance": 0.02},  # bf16 autocast on both sides
    "dry_run": {"device": "cpu", "model": "tiny", "num_images": 120, "image_size_px": 32, "crop_px": 256,
                "batch_size": 16, "train_counts": {"warmup": 1, "steps": 2, "rounds": 2, "eval_batches": 1},
                "compile_backend": "eager", "search_epochs": 2, "gpus_per_trial": 0.0,
                "predict_tolerance": 1e-4},  # float32 on both sides
}
TRIALS = 4
TARGETS = {"full_images_per_s": 2500, "lora_to_full": 1.2, "bf16_branch_error": 0.01}


def bench_gpu(results_dir: Path = Path("results"), dry_run: bool = False) -> dict:
    """Run the five checks; write gpu.json and summary.txt in a new folder under results/bench/; return the JSON."""
    if not dry_run and not torch.cuda.is_available():
        raise GalaxyTuneError("bench gpu needs a CUDA GPU and torch sees none: check `nvidia-smi` and that torch is "
                              "a CUDA build, or run `bench gpu --dry-run` to try the script on the CPU")
    plan = PLANS["dry_run" if dry_run else "gpu"]
    folder = bench_dir(results_dir) / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}{'-dry-run' if dry_run else ''}"
    started = time.perf_counter()
    data_dir = write_demo_data(folder / DEMO_FOLDER, num_images=plan["num_images"], seed=0)
    checks = {}
    for name, check in (("training", check_training), ("compile", check_compile), ("search", check_search),
                        ("lora_bf16", check_lora_bf16), ("retrain_predict", check_retrain_predict)):
        checks[name] = run_check(check, plan, data_dir, folder, checks, dry_run)
    device = torch.device(plan["device"])
    figures = {"benchmark": "gpu", "dry_run": dry_run, "folder": str(folder), "plan": plan, "targets": TARGETS,
               "checks": checks, "passed": all(c["passed"] is not False for c in checks.values()),
               "seconds": time.perf_counter() - started, "environment": {**environment(device), **gpu_info(device)}}
    write_json(figures, folder / "gpu.json")
    summary = summary_text(figures)
    (folder / "summary.txt").write_text(summary + "\n")
    print(f"\n{summary}\nfigures in {folder / 'gpu.json'}, this summary in {folder / 'summary.txt'}")
    return figures


def run_check(check, plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """One check's figures, its time, and passed: True, False, or None where no target applies; an error fails
    the check (with its message) rather than the whole run."""
    started = time.perf_counter()
    try:
        figures = check(plan, data_dir, folder, done, dry_run)
    except Exception as err:  # noqa: BLE001 - one broken check must not hide the others' figures
        traceback.print_exc()
        figures = {"passed": False, "error": f"{type(err).__name__}: {err}", "summary": f"error: {err}"}
    gc.collect()
    if torch.cuda.is_available():  # hand this process's cached GPU memory back before the next check (the trials)
        torch.cuda.empty_cache()
    return {**figures, "seconds": time.perf_counter() - started}


def train_figures(plan: dict, data_dir: Path, folder: Path, methods: list[str], **settings) -> dict:
    return bench_train(data_dir, folder, model=plan["model"], image_size_px=plan["image_size_px"],
                       crop_px=plan["crop_px"], batch_size=plan["batch_size"], method=methods, device=plan["device"],
                       **{**plan["train_counts"], **settings})


def check_training(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """Full and LoRA training images/s in one run, round by round, and their peak memory: LoRA with the reference
    recipe's BatchNorm (batch statistics; the target applies to it), then, against full again, with a frozen
    BatchNorm (folded into the convolutions)."""
    figures = train_figures(plan, data_dir, folder, ["full", "lora"])
    frozen = train_figures(plan, data_dir, folder, ["full", "lora"], lora_batchnorm="frozen", eval_batches=0)
    full, lora = (figures["methods"][m]["train_images_per_s"] for m in ("full", "lora"))
    ratio, frozen_ratio = (f["lora_to_full"]["train_speed"]["median"] for f in (figures, frozen))
    memory, frozen_memory = (f["lora_to_full"]["peak_memory_ratio"] for f in (figures, frozen))
    passed = None if dry_run else full >= TARGETS["full_images_per_s"] and ratio >= TARGETS["lora_to_full"]
    return {"full_images_per_s": full, "lora_images_per_s": lora, "lora_to_full": ratio, "peak_memory_ratio": memory,
            "frozen_batchnorm_lora_to_full": frozen_ratio, "frozen_batchnorm_peak_memory_ratio": frozen_memory,
            "target": f"full >= {TARGETS['full_images_per_s']:,} img/s, LoRA >= {TARGETS['lora_to_full']}x full",
            "passed": passed, "bench_train": figures, "bench_train_frozen_batchnorm": frozen,
            "summary": f"full {full:,.0f} img/s, LoRA {lora:,.0f} img/s = {ratio:.2f}x full (median of rounds), "
                       f"peak memory {memory:.2f}x; with a frozen BatchNorm {frozen_ratio:.2f}x, memory "
                       f"{frozen_memory:.2f}x ({plan['image_size_px']} px, batch {plan['batch_size']})"}


def check_compile(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """Full fine-tuning compiled, against the uncompiled run of the training check."""
    figures = train_figures(plan, data_dir, folder, ["full"], compile_model=True,
                            compile_backend=plan["compile_backend"], eval_batches=0)
    on = figures["methods"]["full"]["train_images_per_s"]
    off = done["training"].get("full_images_per_s")
    speedup = on / off if off else None
    return {"backend": plan["compile_backend"], "compiled_images_per_s": on, "uncompiled_images_per_s": off,
            "speedup": speedup, "target": "compiles and trains", "passed": True, "bench_train": figures,
            "summary": f"full, torch.compile ({plan['compile_backend']}): {on:,.0f} img/s"
                       + (f" vs {off:,.0f} without = {speedup:.2f}x" if speedup else "")}


def check_search(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """4 trials sharing one GPU: 4 worker processes, all running at once, no trial failed (e.g. out of memory).

    The dry run's trials share the CPUs and last under a second, so Ray may run several in one process one after
    another: there only the failures count."""
    import ray

    from ..search.cluster import start_ray
    from ..search.run import SearchOptions, run_search
    from .searching import search_figures

    started_ray = not ray.is_initialized()
    start_ray(None)
    try:  # as many CPUs per trial as lets all 4 run at once, at most 1
        cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / TRIALS)
        data = DataConfig(data_dir, image_size_px=plan["image_size_px"], crop_px=plan["crop_px"])
        experiment = run_search(SearchOptions(
            "full", data, results_dir=folder / "searches", name="shared-gpu", num_samples=TRIALS,
            max_epochs=plan["search_epochs"], model=plan["model"], cpus_per_trial=cpus,
            gpus_per_trial=plan["gpus_per_trial"], device=plan["device"], max_concurrent=TRIALS,
            scheduler="fifo"))
    finally:
        if started_ray:
            ray.shutdown()
    figures = search_figures(experiment, TRIALS)
    processes, at_once, errored = figures["processes"], figures["most_trials_at_once"], figures["errored_trials"]
    share = f"{plan['gpus_per_trial']:g} GPU" if plan["gpus_per_trial"] else f"{cpus:g} CPU, no GPU"
    return {"trials": figures["trials"], "processes": processes, "most_trials_at_once": at_once,
            "errored_trials": errored, "gpus_per_trial": plan["gpus_per_trial"], "cpus_per_trial": cpus,
            "wall_seconds": figures["wall_seconds"], "experiment": str(experiment),
            "target": f"{TRIALS} trials, none errored" + ("" if dry_run else f" (e.g. out of memory), {TRIALS} "
                                                          f"processes, {TRIALS} trials at once"),
            "passed": figures["trials"] == TRIALS and errored == 0 and (dry_run or processes == at_once == TRIALS),
            "summary": f"{figures['trials']} trials at {share} each: {processes} worker process"
                       f"{'es' * (processes != 1)}, {at_once} surely at once, {errored} errored"}


def check_lora_bf16(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """The adapter's effect on a layer's output under bf16 autocast vs float32: as the branch computes it in
    training, and through a merged bf16 weight W + ΔW (which rounds most of a small ΔW away)."""
    device = torch.device(plan["device"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        lora = LoraConv2d(conv, rank=8, alpha=8)
        x = torch.randn(4, 64, 16, 16)
    with torch.no_grad():  # a ΔW of 3e-4 of W in norm: the size of an early step at a low learning rate
        lora.lora_B.weight.normal_()
        lora.lora_B.weight *= 3e-4 * conv.weight.norm() / lora.delta_weight().norm()
    lora, x = lora.to(device).train(), x.to(device)
    with torch.no_grad(), full_precision():
        reference = lora(x) - conv(x)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        branch = (lora(x.requires_grad_()) - conv(x)).float().detach()  # with a gradient: training's layer
        with torch.no_grad():
            merged = (F.conv2d(x, conv.weight + lora.delta_weight(), padding=1) - conv(x)).float()
    branch_error, merged_error = (((e - reference).norm() / reference.norm()).item() for e in (branch, merged))
    return {"branch_error": branch_error, "merged_error": merged_error,
            "target": f"branch error < {TARGETS['bf16_branch_error']:.0%}",
            "passed": branch_error < TARGETS["bf16_branch_error"],
            "summary": f"adapter effect vs float32: branch {branch_error:.2%} off, merged bf16 weight "
                       f"{merged_error:.0%} off"}


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


def gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    properties = torch.cuda.get_device_properties(device)
    return {"gpu_memory_gb": properties.total_memory / 1024**3, "gpu_count": torch.cuda.device_count(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def summary_text(figures: dict) -> str:
    checks = figures["checks"]
    failed = [name for name, c in checks.items() if c["passed"] is False]
    mode = "dry run on the CPU (tiny model, 32 px; speed targets not applied)" if figures["dry_run"] else "GPU"
    lines = [f"bench gpu, {mode}: {figures['environment']['device_name']}, torch {figures['environment']['torch']}: "
             + (f"FAILED {', '.join(failed)}" if failed else "all checks passed")
             + f" in {figures['seconds']:.0f} s"]
    for name, check in checks.items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[check["passed"]]
        target = f" (target: {check['target']})" if "target" in check else ""
        lines.append(f"  {verdict:<4}  {name:<16} {check['summary']}{target}  [{check['seconds']:.0f} s]")
    return "\n".join(lines)
