"""`bench gpu`'s checks of the training step on the device: its speed, with and without `torch.compile` and with
either LoRA sum, each measured side by side, and its numbers against fp32 (gradients, the LoRA adapter's effect)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..data.loader import ImageSplit, batches, open_splits
from ..data.prepare import DataConfig, Prepared, prepare, prepared_folder
from ..data.tasks import DEFAULT_TASK, get_task
from ..models.lora import LORA_SUMS, LoraConv2d, set_lora_sum
from ..train import (METHODS, REFERENCE_CONFIGS, TrainConfig, make_model, make_optimizer, pick_device, place,
                     train_step, training_loss)
from .measure import full_precision, rate, ratio_spread, split_evenly
from .training import DEFAULTS, bench_train, train_in_turns, trainee

TARGETS = {"full_images_per_s": 2500, "lora_to_full": 1.2, "gradient_error": 0.05, "bf16_branch_error": 0.01}


def open_demo(plan: dict, data_dir: Path, folder: Path, task: str = DEFAULT_TASK) -> tuple[Prepared, ImageSplit,
                                                                                                ImageSplit]:
    """The demo data of the plan, prepared for `task` under the benchmark's folder; its train and val splits."""
    config = DataConfig(data_dir, task=task, image_size_px=plan["image_size_px"], crop_px=plan["crop_px"])
    prepared = prepare(config, prepared_folder(folder, config))
    return (prepared, *open_splits(prepared, "train", "val"))


def timed_in_turns(plan: dict, trainees: dict, device: torch.device) -> dict[str, list[dict]]:
    """`train_in_turns` with the plan's warm-up, steps and rounds (bench train's defaults on a GPU)."""
    counts = {**DEFAULTS[device.type], **plan["train_counts"]}
    return train_in_turns(trainees, counts["warmup"], split_evenly(counts["steps"], counts["rounds"]), device)


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
    """Full and LoRA (its autograd function included) compiled, each against the same model uncompiled, side by
    side; before any step, one batch's training loss through both (the same weights) must agree."""
    device = pick_device(plan["device"])
    prepared, train, _ = open_demo(plan, data_dir, folder)
    task = get_task(prepared.task)
    x, y = next(batches(train, plan["batch_size"], device))
    trainees, loss_difference = {}, {}
    for method in METHODS:
        for name, backend in ((method, None), (f"{method}_compiled", plan["compile_backend"])):
            trainees[name] = trainee(method, plan["model"], len(prepared.class_names), train, plan["batch_size"], 8,
                                     "stats", device, backend)
        eager, compiled = (training_loss(trainees[n].run, x, y, device, task=task).item()
                           for n in (method, f"{method}_compiled"))
        loss_difference[method] = abs(compiled - eager) / abs(eager)
    timings = timed_in_turns(plan, trainees, device)
    speedup = {m: ratio_spread(timings[f"{m}_compiled"], timings[m])["median"] for m in METHODS}
    tolerance = plan["compile_tolerance"]
    return {"backend": plan["compile_backend"], "speedup": speedup, "loss_relative_difference": loss_difference,
            "images_per_s": {name: rate(rounds) for name, rounds in timings.items()},
            "target": f"compiles and trains, loss within {tolerance:g} of uncompiled",
            "passed": all(d <= tolerance for d in loss_difference.values()),
            "summary": f"torch.compile ({plan['compile_backend']}) / uncompiled: full {speedup['full']:.2f}x, LoRA "
                       f"{speedup['lora']:.2f}x (median of rounds); loss differences "
                       f"{loss_difference['full']:.1g}, {loss_difference['lora']:.1g}"}


def gradient_error(config: TrainConfig, model_name: str, prepared: Prepared, train: ImageSplit,
                   device: torch.device) -> float:
    """‖g − g₃₂‖ / ‖g₃₂‖ over the trainable weights: one batch's gradients through the training path
    (`training_loss`, in the device's training precision) against fp32 (no autocast, no TF32). After one training
    step, so that LoRA's B matrices are no longer zero and A gets gradients too."""
    task = get_task(prepared.task)
    model = place(make_model(config, model_name, num_labels=len(prepared.class_names),
                             head_bias=task.head_bias(train.labels)), device).train()
    stream = batches(train, config.batch_size, device, shuffle=True, seed=0)
    train_step(model, make_optimizer(config, model), *next(stream), device, task=task)
    x, y = next(stream)
    gradients = []
    for reference in (False, True):
        model.zero_grad(set_to_none=True)
        if reference:
            with full_precision():
                task.loss(model(pixel_values=x).logits.float(), y).backward()
        else:
            training_loss(model, x, y, device, task=task).backward()
        gradients.append(torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]))
    trained, exact = gradients
    return ((trained - exact).norm() / exact.norm()).item()


def check_gradients(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """Full and LoRA: one batch's gradients through the training path against fp32 (`gradient_error`)."""
    device = pick_device(plan["device"])
    prepared, train, _ = open_demo(plan, data_dir, folder)
    errors = {m: gradient_error(dataclasses.replace(REFERENCE_CONFIGS[m], batch_size=plan["batch_size"]),
                                plan["model"], prepared, train, device) for m in METHODS}
    bound = TARGETS["gradient_error"]
    return {"gradient_error": errors, "target": f"‖g - g_fp32‖ / ‖g_fp32‖ < {bound:.0%}",
            "passed": all(e < bound for e in errors.values()),
            "summary": f"gradients vs fp32: full {errors['full']:.2%} off, LoRA {errors['lora']:.2%} off"}


def check_lora_bf16(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """The adapter's effect on a layer's output under bf16 autocast vs float32: as the branch computes it in
    training, added to the base output in fp32 (the default) and cast back to bf16 after that add (what the
    layers after it then see), and through a merged bf16 weight W + ΔW (which rounds most of a small ΔW away)."""
    device = torch.device(plan["device"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        lora = LoraConv2d(conv, rank=8, alpha=8)
        x = torch.randn(4, 64, 16, 16)
    with torch.no_grad():  # a ΔW of 3e-4 of W in norm: the size of an early step at a low learning rate
        lora.lora_B.weight.normal_()
        lora.lora_B.weight *= 3e-4 * conv.weight.norm() / lora.delta_weight().norm()
    lora, x = lora.to(device).train(), x.to(device).requires_grad_()
    with torch.no_grad(), full_precision():
        reference = lora(x) - conv(x)
    effects = {}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for sum_dtype in LORA_SUMS:  # with a gradient: training's layer
            set_lora_sum(lora, sum_dtype)
            effects[sum_dtype] = (lora(x) - conv(x)).float().detach()
        with torch.no_grad():
            effects["merged"] = (F.conv2d(x, conv.weight + lora.delta_weight(), padding=1) - conv(x)).float()
    set_lora_sum(lora, "fp32")
    errors = {name: ((effect - reference).norm() / reference.norm()).item() for name, effect in effects.items()}
    return {"branch_error": errors["fp32"], "cast_sum_error": errors["autocast"], "merged_error": errors["merged"],
            "target": f"branch error < {TARGETS['bf16_branch_error']:.0%}",
            "passed": errors["fp32"] < TARGETS["bf16_branch_error"],
            "summary": f"adapter effect vs float32: added in fp32 {errors['fp32']:.2%} off, that sum cast back to bf16 "
                       f"{errors['autocast']:.0%} off, merged bf16 weight {errors['merged']:.0%} off"}


def check_lora_sum(plan: dict, data_dir: Path, folder: Path, done: dict, dry_run: bool) -> dict:
    """LoRA training images/s and peak memory with the adapter's effect added in fp32 (the default: BatchNorm, ReLU
    and the residual add after each adapted convolution then run in fp32) against that sum cast back to the
    autocast dtype, side by side. No target: `lora_bf16` says what the cast costs in accuracy."""
    device = pick_device(plan["device"])
    prepared, train, _ = open_demo(plan, data_dir, folder)
    trainees = {}
    for sum_dtype in LORA_SUMS:
        trainees[sum_dtype] = trainee("lora", plan["model"], len(prepared.class_names), train, plan["batch_size"], 8,
                                      "stats", device, None)
        set_lora_sum(trainees[sum_dtype].net, sum_dtype)
    timings = timed_in_turns(plan, trainees, device)
    memory = {s: one.peak_memory(device)["peak_memory_mb"] for s, one in trainees.items()}
    speed = ratio_spread(timings["autocast"], timings["fp32"])
    return {"images_per_s": {s: rate(rounds) for s, rounds in timings.items()}, "cast_to_fp32_speed": speed,
            "peak_memory_mb": memory, "cast_to_fp32_memory": memory["autocast"] / memory["fp32"], "passed": None,
            "summary": f"LoRA with the sum cast back to bf16 / added in fp32: {speed['median']:.2f}x the images/s "
                       f"(median of {len(speed['rounds'])} rounds, {speed['min']:.2f}-{speed['max']:.2f}x), "
                       f"{memory['autocast'] / memory['fp32']:.2f}x the peak memory"}
