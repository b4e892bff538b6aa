"""`bench gpu`: one command that checks a GPU machine, with a budget of about 10 minutes on one H100-class GPU.

On demo data generated on the spot it runs these checks with the project's own code, and writes one JSON (the
figures, the environment, the precision training ran in) and a short text summary with each check against its
target:
- training: images/s at 224 px, full fine-tuning and LoRA side by side (`bench_train`: fit's loop, whole
  pipeline), LoRA with the reference recipe's BatchNorm and with a frozen one;
- compile: full and LoRA with `torch.compile`, each against the same model without, side by side;
- gradients: one batch's gradients through the training path against fp32, full and LoRA;
- lora_bf16: the LoRA adapter's effect under bf16 autocast against fp32: added in fp32, cast back, merged;
- lora_sum: LoRA images/s with the adapter's effect added in fp32 against the sum cast back to bf16;
- resume: a trial's checkpoint, saved and loaded as a trial does, resumed onto the GPU;
- votes: the kaggle-votes task (37 outputs, RMSE): LoRA's gradients against fp32, then training;
- search: 8 LoRA trials at 0.25 GPU (`run_search`), 4 at once, ASHA stopping some, workers reused;
- retrain_predict: `retrain` then `predict` on the GPU: the exported model's probabilities against the retrain's.

Training runs in bf16 autocast on GPUs of compute capability 8 (Ampere) or later and in fp32 on older ones, which
emulate bf16 slowly (`train.training_precision`); the figures and the summary say which ran.

`--dry-run` runs the same code on the CPU with a tiny model and 32 px images in about a minute, so the
script can't rot unnoticed: the test suite runs it. Speed targets are not applied to a dry run, and its search runs
4 trials, 2 at once.
"""

from __future__ import annotations

import gc
import time
import traceback
from pathlib import Path

import torch

from ..data.demo import DEMO, DEMO_FOLDER, write_demo_data
from ..errors import GalaxyTuneError
from ..train import pick_device, training_precision
from .gpu_runs import check_resume, check_retrain_predict, check_search, check_votes
from .gpu_training import TARGETS, check_compile, check_gradients, check_lora_bf16, check_lora_sum, check_training
from .measure import bench_dir, environment, write_json

# What each mode runs: the GPU check at full size, the dry run at the smallest that exercises every path.
PLANS = {
    "gpu": {"device": "cuda", "model": "resnet50-random", "num_images": DEMO["num_images"], "image_size_px": 224,
            "crop_px": None, "batch_size": 32, "train_counts": {}, "compile_backend": "inductor",
            "search_epochs": 8, "gpus_per_trial": 0.25,  # trials long enough (~10 s) to overlap despite start-up
            "search_trials": 8, "search_at_once": 4,  # twice as many trials as run at once: workers are reused
            # bf16 autocast on both sides, cuDNN's non-deterministic kernels, inductor's fused kernels
            "predict_tolerance": 0.02, "resume_tolerance": 0.05, "compile_tolerance": 0.02},
    "dry_run": {"device": "cpu", "model": "tiny", "num_images": 120, "image_size_px": 32, "crop_px": 256,
                "batch_size": 16, "train_counts": {"warmup": 1, "steps": 2, "rounds": 2, "eval_batches": 1},
                "compile_backend": "eager", "search_epochs": 2, "gpus_per_trial": 0.0,
                "search_trials": 4, "search_at_once": 2,  # each worker process imports torch: seconds of CPU
                # float32 on both sides, on the CPU: deterministic
                "predict_tolerance": 1e-4, "resume_tolerance": 1e-5, "compile_tolerance": 1e-5},
}
CHECKS = {"training": check_training, "compile": check_compile, "gradients": check_gradients,
          "lora_bf16": check_lora_bf16, "lora_sum": check_lora_sum, "resume": check_resume, "votes": check_votes,
          "search": check_search, "retrain_predict": check_retrain_predict}


def bench_gpu(results_dir: Path = Path("results"), dry_run: bool = False) -> dict:
    """Run the checks; write gpu.json and summary.txt in a new folder under results/bench/; return the JSON."""
    if not dry_run and not torch.cuda.is_available():
        raise GalaxyTuneError("bench gpu needs a CUDA GPU and torch sees none: check `nvidia-smi` and that torch is "
                              "a CUDA build, or run `bench gpu --dry-run` to try the script on the CPU")
    plan = PLANS["dry_run" if dry_run else "gpu"]
    device = pick_device(plan["device"])
    precision = training_precision(device)  # first: an older GPU's warning comes before the checks
    folder = bench_dir(results_dir) / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}{'-dry-run' if dry_run else ''}"
    started = time.perf_counter()
    data_dir = write_demo_data(folder / DEMO_FOLDER, num_images=plan["num_images"], seed=0)
    checks = {}
    for name, check in CHECKS.items():
        checks[name] = run_check(check, plan, data_dir, folder, checks, dry_run)
    figures = {"benchmark": "gpu", "dry_run": dry_run, "folder": str(folder), "plan": plan, "targets": TARGETS,
               "precision": precision, "checks": checks,
               "passed": all(c["passed"] is not False for c in checks.values()),
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


def gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    properties = torch.cuda.get_device_properties(device)
    return {"gpu_memory_gb": properties.total_memory / 1024**3, "gpu_count": torch.cuda.device_count(),
            "compute_capability": f"{properties.major}.{properties.minor}", "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def summary_text(figures: dict) -> str:
    checks = figures["checks"]
    failed = [name for name, c in checks.items() if c["passed"] is False]
    mode = "dry run on the CPU (tiny model, 32 px; speed targets not applied)" if figures["dry_run"] else "GPU"
    lines = [f"bench gpu, {mode}: {figures['environment']['device_name']}, torch {figures['environment']['torch']}, "
             f"training in {figures['precision']}: "
             + (f"FAILED {', '.join(failed)}" if failed else "all checks passed")
             + f" in {figures['seconds']:.0f} s"]
    for name, check in checks.items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[check["passed"]]
        target = f" (target: {check['target']})" if "target" in check else ""
        lines.append(f"  {verdict:<4}  {name:<16} {check['summary']}{target}  [{check['seconds']:.0f} s]")
    return "\n".join(lines)
