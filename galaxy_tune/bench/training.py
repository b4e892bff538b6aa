"""`bench train`: training and eval images/s and peak memory of one model; for LoRA, merged vs unmerged eval
and the size of the adapters next to a full checkpoint."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..data import DataConfig, prepare, prepared_folder

from ..loader import ImageSplit, batches, open_split
from ..errors import GalaxyTuneError
from ..lora import save_adapters, set_lora_merging, to_plain_model
from ..train import METHODS, REFERENCE_CONFIGS, autocast, make_model, make_optimizer, place, train_step
from .measure import (alternating_rates, bench_dir, environment, peak_memory_mb, peak_memory_start, print_table,
                      resolve_data_dir, resolve_device, steady_rate, torch_threads)


def bench_train(data_dir: Path | None = None, results_dir: Path = Path("results"), model: str = "resnet50-random",
                image_size_px: int = 224, crop_px: int | None = None, batch_size: int = 32, method: str = "full",
                lora_rank: int = 8, steps: int | None = None, warmup: int | None = None, device: str | None = None,
                compile_model: bool = False, threads: int | None = None) -> dict:
    """Training and eval images/s (steady state, data included) and peak memory of one model on one device.

    For LoRA also: eval with adapters merged into the convs vs unmerged, a check that both give the same
    outputs, and the size of the saved adapters next to a full checkpoint. Defaults: 10 warm-up + 50 timed
    steps on CUDA, 1 + 2 on the CPU (a ResNet-50 step at 224 px takes ~20 s on 2 cores).
    """
    if method not in METHODS:
        raise GalaxyTuneError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    results_dir = Path(results_dir)
    data_dir = resolve_data_dir(data_dir, results_dir)
    device = resolve_device(device)
    on_gpu = device.type == "cuda"
    steps, warmup = steps or (50 if on_gpu else 2), warmup or (10 if on_gpu else 1)
    compiled = compile_model and on_gpu
    if compile_model and not on_gpu:
        print("note: --compile applies on CUDA only; running the CPU model as is")

    data_config = DataConfig(data_dir, image_size_px=image_size_px, crop_px=crop_px)
    prepared = prepare(data_config, prepared_folder(results_dir, data_config))
    train = open_split(prepared, "train")
    if len(train) < batch_size:
        raise GalaxyTuneError(f"--batch-size {batch_size} exceeds the {len(train)} training images: lower it")
    config = dataclasses.replace(REFERENCE_CONFIGS[method], batch_size=batch_size, lora_rank=lora_rank)
    net = place(make_model(config, model, num_labels=len(prepared.class_names)), device)
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    run = torch.compile(net) if compiled else net
    optimizer = make_optimizer(config, net)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        train_step(run, optimizer, x, y, device).item()  # fit reads the loss every step, which waits for the GPU

    @torch.no_grad()
    def logits(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(device):
            return run(pixel_values=x).logits.float()

    with torch_threads(threads):
        threads = torch.get_num_threads()
        memory_before = peak_memory_start(device)
        net.train()
        train_rate = steady_rate(step, endless_batches(train, batch_size, device, augment=True),
                                  warmup, steps, device)
        peak_mb = peak_memory_mb(device)
        eval_batches = endless_batches(train, batch_size, device, augment=False)
        probe = next(eval_batches)[0].clone()  # the next batch overwrites it
        if method == "lora":
            # Merged and unmerged take turns, so load from other processes hits both alike.
            eval_rates = alternating_rates({"merged": lambda: set_lora_merging(net, True),
                                            "unmerged": lambda: set_lora_merging(net, False)},
                                           logits, eval_batches, warmup, steps, device)
            set_lora_merging(net, False)
            unmerged_logits = logits(probe)
            set_lora_merging(net, True)  # how eval() leaves a LoRA model: B @ A folded into the conv weights
            merged_logits = logits(probe)
        else:
            net.eval()
            eval_rates = {"plain": steady_rate(logits, eval_batches, warmup, steps, device)}
    eval_rate = eval_rates.get("merged", eval_rates.get("plain"))

    figures = {
        "benchmark": "train",
        "settings": {"model": model, "method": method, "image_size_px": image_size_px, "crop_px": crop_px,
                     "batch_size": batch_size, "lora_rank": lora_rank if method == "lora" else None,
                     "steps": steps, "warmup": warmup, "device": str(device), "torch_threads": threads,
                     "bf16_autocast": on_gpu, "channels_last": True, "compiled": compiled,
                     "data_dir": str(data_dir)},
        "train_images_per_s": train_rate, "eval_images_per_s": eval_rate,
        "peak_memory_mb": peak_mb, "memory_before_mb": memory_before,
        "memory_measure": "torch.cuda.max_memory_allocated" if on_gpu else "process peak RSS (VmHWM)",
        "full_checkpoint_bytes": checkpoint_bytes(to_plain_model(net) if method == "lora" else net, results_dir),
        "environment": environment(device),
    }
    rows = [("train", f"{train_rate:,.1f} images/s"), ("eval", f"{eval_rate:,.1f} images/s"),
            ("peak memory while training",
             f"{peak_mb:,.0f} MB ({figures['memory_measure']}; {memory_before:,.0f} MB before)"),
            ("full checkpoint (safetensors)", f"{figures['full_checkpoint_bytes']:,} bytes")]
    if method == "lora":
        difference = (merged_logits - unmerged_logits).abs().max().item()
        relative = difference / max(unmerged_logits.abs().max().item(), 1e-12)
        tolerance = 2e-2 if on_gpu else 1e-4  # bf16 on CUDA, float32 on the CPU
        adapter_bytes = checkpoint_bytes(net, results_dir, adapters_only=True)
        share = adapter_bytes / figures["full_checkpoint_bytes"]
        merged_speedup = eval_rates["merged"] / eval_rates["unmerged"]
        figures.update({
            "eval_merged_images_per_s": eval_rates["merged"], "eval_unmerged_images_per_s": eval_rates["unmerged"],
            "merged_speedup": merged_speedup, "merged_max_abs_diff": difference,
            "merged_relative_diff": relative, "merged_matches_unmerged": relative <= tolerance,
            "lora_artifact_bytes": adapter_bytes, "lora_to_full_checkpoint_ratio": share,
        })
        rows[1:2] = [("eval, adapters merged", f"{eval_rates['merged']:,.1f} images/s"),
                     ("eval, adapters unmerged", f"{eval_rates['unmerged']:,.1f} images/s"),
                     ("merged / unmerged eval speed", f"{merged_speedup:.2f}x"),
                     ("merged outputs = unmerged",
                      f"{relative <= tolerance} (max abs diff {difference:.2g}, relative {relative:.2g})")]
        rows.append((f"LoRA artefact (adapters + head + BatchNorm, rank {lora_rank})",
                     f"{adapter_bytes:,} bytes = {share:.1%} of the full checkpoint"))
    print_table(f"bench train: {model} {method}, {image_size_px} px, batch {batch_size}, {device}, "
                f"{threads} torch thread(s), {warmup} warm-up + {steps} timed steps", rows)
    return figures


def endless_batches(split: ImageSplit, batch_size: int, device: torch.device, *,
                    augment: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Full batches of galaxy_tune's pipeline as `fit` draws them, epoch after epoch (a short last batch would
    skew per-step time)."""
    epoch = 0
    while True:
        for x, y in batches(split, batch_size, device, shuffle=True, augment=augment, seed=epoch, reuse=True):
            if len(y) == batch_size:
                yield x, y
        epoch += 1


def checkpoint_bytes(model: nn.Module, results_dir: Path, adapters_only: bool = False) -> int:
    """Size of the model saved as safetensors: its full state dict, or (LoRA) what `save_adapters` writes."""
    with tempfile.TemporaryDirectory(dir=bench_dir(results_dir)) as folder:
        path = Path(folder) / "model.safetensors"
        if adapters_only:
            save_adapters(model, path)
        else:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
        return path.stat().st_size
