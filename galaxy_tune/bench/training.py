"""`bench train`: images/s and peak memory of the real training loop (`train.train_steps`, fit's per-step code)
for one method or several side by side, eval images/s as `predict_logits` runs it, and for LoRA merged vs
branch eval, their agreement and the size of the adapters next to a full checkpoint.

With several methods (`--method full lora`) every model is built and warmed up, then the methods take turns
round by round (A, B, A, B, ...): the ratio of their images/s is the median of the rounds' ratios, so it holds
when other processes share the machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..data.prepare import DataConfig, prepare, prepared_folder
from ..errors import GalaxyTuneError
from ..data.loader import ImageSplit, batches, open_split
from ..models.lora import BATCHNORM_MODES, save_adapters, set_lora_merging, to_plain_model
from ..train import (METHODS, REFERENCE_CONFIGS, make_model, make_optimizer, make_scheduler, pick_device, place,
                     predict_logits, train_steps, training_precision)
from .measure import (bench_dir, environment, fmt_spread, full_precision, interleaved, peak_memory_mb,
                      peak_memory_start, print_table, rate, ratio_spread, resolve_data_dir, split_evenly,
                      synchronize, tensors_mb, torch_threads)

EVAL_BATCH = 64  # the batch of `evaluate` and `predict_logits`
# When not given: warm-up steps, timed steps (per method, over all rounds), rounds, timed eval batches.
# A ResNet-50 step at 224 px takes 5-20 s on 2 CPU cores, ~10 ms on an H100.
DEFAULTS = {"cuda": {"warmup": 30, "steps": 100, "rounds": 5, "eval_batches": 20},
            "cpu": {"warmup": 1, "steps": 4, "rounds": 4, "eval_batches": 2}}


@dataclasses.dataclass
class Trainee:
    """One method's model, optimizer and scheduler as `fit` builds them, and its endless training batches."""

    method: str
    net: nn.Module
    run: nn.Module  # net, or torch.compile(net)
    optimizer: torch.optim.Optimizer
    scheduler: object
    stream: Iterator[tuple[torch.Tensor, torch.Tensor]]

    def steps(self, count: int, device: torch.device) -> int:
        """`count` steps of fit's loop, then its one wait for the device (fit reads the loss once per epoch)."""
        loss_sum, seen = train_steps(self.run, self.optimizer, self.scheduler, device,
                                     itertools.islice(self.stream, count))
        loss_sum.item()
        return seen

    def timed(self, count: int, device: torch.device) -> dict:
        synchronize(device)
        started = time.perf_counter()
        seen = self.steps(count, device)
        return {"images": seen, "seconds": time.perf_counter() - started}

    def peak_memory(self, device: torch.device) -> dict:
        """Peak MB of one step: this model's weights, gradients and optimizer state, plus the step's working memory
        above what was in use before it (activations, temporaries). An untimed step: on the CPU, measuring starts
        by handing freed memory back to the system, which would slow the step after it."""
        in_use = peak_memory_start(device)
        self.steps(1, device)
        working = peak_memory_mb(device) - in_use
        state = tensors_mb([*self.net.parameters(), *self.net.buffers(),
                            *(p.grad for p in self.net.parameters() if p.grad is not None),
                            *(v for s in self.optimizer.state.values() for v in s.values())])
        return {"peak_memory_mb": state + working, "state_mb": state, "peak_working_mb": working}


def bench_train(data_dir: Path | None = None, results_dir: Path = Path("results"), model: str = "resnet50-random",
                image_size_px: int = 224, crop_px: int | None = None, batch_size: int = 32,
                method: str | Sequence[str] = "full", lora_rank: int = 8, lora_batchnorm: str = "stats",
                steps: int | None = None,
                warmup: int | None = None, rounds: int | None = None, eval_batches: int | None = None,
                device: str | None = None, compile_model: bool = False, compile_backend: str = "inductor",
                threads: int | None = None) -> dict:
    """Training images/s (fit's loop, data included, one wait per round) and peak memory of each method.

    `steps` timed steps per method are split over `rounds`, after `warmup` untimed ones; then `eval_batches`
    batches of 64 are timed per model as `predict_logits` runs them. `compile_model` compiles the training model
    (eval runs it uncompiled). Defaults: DEFAULTS, per device.
    """
    methods = [method] if isinstance(method, str) else list(method)
    if not methods or len(set(methods)) < len(methods) or not set(methods) <= set(METHODS):
        raise GalaxyTuneError(f"--method {' '.join(map(repr, methods))}: choose {' or '.join(METHODS)}, or both "
                              "(each once) to compare them in one run")
    if lora_batchnorm not in BATCHNORM_MODES:
        raise GalaxyTuneError(f"--lora-batchnorm {lora_batchnorm!r}: choose {', '.join(BATCHNORM_MODES)}")
    device = pick_device(device)
    given = {"warmup": warmup, "steps": steps, "rounds": rounds, "eval_batches": eval_batches}
    counts = {name: DEFAULTS[device.type][name] if value is None else value for name, value in given.items()}
    for name, value in counts.items():
        low = 1 if name in ("steps", "rounds") else 0
        if value < low:
            raise GalaxyTuneError(f"--{name.replace('_', '-')} {value} must be {low} or more")
    results_dir = Path(results_dir)
    data_config = DataConfig(resolve_data_dir(data_dir, results_dir), image_size_px=image_size_px, crop_px=crop_px)
    prepared = prepare(data_config, prepared_folder(results_dir, data_config))
    train = open_split(prepared, "train")
    if len(train) < batch_size:
        raise GalaxyTuneError(f"--batch-size {batch_size} exceeds the {len(train)} training images: lower it")
    sizes = split_evenly(counts["steps"], counts["rounds"])

    with torch_threads(threads):
        threads = torch.get_num_threads()
        trainees = {m: trainee(m, model, len(prepared.class_names), train, batch_size, lora_rank, lora_batchnorm,
                               device, compile_backend if compile_model else None) for m in methods}
        timings = train_in_turns(trainees, counts["warmup"], sizes, device)
        memory = {m: one.peak_memory(device) for m, one in trainees.items()}
        evals = eval_timings(trainees, train, counts["eval_batches"], counts["rounds"], device)
        agreement = merged_vs_branch(trainees["lora"].net, train, device) if "lora" in trainees else None

    per_method = {m: {"train_images_per_s": rate(timings[m]),
                      "train_images_per_s_per_round": [r["images"] / r["seconds"] for r in timings[m]],
                      **memory[m], "eval_images_per_s": rate(evals[m]) if evals else None} for m in methods}
    full_bytes = checkpoint_bytes(next(iter(trainees.values())).net, results_dir, plain=True)
    figures = {
        "benchmark": "train",
        "settings": {"model": model, "methods": methods, "image_size_px": image_size_px, "crop_px": crop_px,
                     "batch_size": batch_size, "lora_rank": lora_rank if "lora" in methods else None,
                     "lora_batchnorm": lora_batchnorm if "lora" in methods else None,
                     **counts, "steps_per_round": sizes, "eval_batch_size": EVAL_BATCH, "device": str(device),
                     "torch_threads": threads, "precision": training_precision(device), "channels_last": True,
                     "compiled": compile_backend if compile_model else None, "data_dir": str(data_config.data_dir)},
        "methods": per_method,
        "lora_to_full": None,
        "memory_measure": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS "
                           "(VmHWM) after malloc_trim") + " in one step, plus the model's weights, grads, optimizer",
        "full_checkpoint_bytes": full_bytes,
        "environment": environment(device),
    }
    if "lora" in methods:
        adapter_bytes = checkpoint_bytes(trainees["lora"].net, results_dir, plain=False)
        per_method["lora"].update(eval_lora_extras(evals, agreement), lora_artifact_bytes=adapter_bytes,
                                  lora_to_full_checkpoint_ratio=adapter_bytes / full_bytes)
    if set(methods) == {"full", "lora"}:
        peak = {m: memory[m]["peak_memory_mb"] for m in methods}
        figures["lora_to_full"] = {"train_speed": ratio_spread(timings["lora"], timings["full"]),
                                   "peak_memory_ratio": peak["lora"] / peak["full"]}
    lora = f" (LoRA rank {lora_rank}, BatchNorm {lora_batchnorm})" if "lora" in methods else ""
    print_table(f"bench train: {model} {' vs '.join(methods)}{lora}, {image_size_px} px, batch {batch_size}, {device}, "
                f"{threads} torch thread(s), {counts['warmup']} warm-up + {counts['steps']} timed steps in "
                f"{len(sizes)} round(s)", table_rows(figures))
    return figures


def train_in_turns(trainees: dict[str, Trainee], warmup: int, sizes: list[int],
                   device: torch.device) -> dict[str, list[dict]]:
    """Warm each trainee up (the allocator, cuDNN's autotuning, compilation, the optimizer's state), then time
    `sizes[n]` steps of each in round n, the trainees taking turns; per trainee, its rounds' images and seconds."""
    for one in trainees.values():
        one.steps(warmup, device)
    return interleaved({name: (lambda n, one=one: one.timed(sizes[n], device)) for name, one in trainees.items()},
                       len(sizes))


def trainee(method: str, model: str, num_labels: int, split: ImageSplit, batch_size: int, lora_rank: int,
            lora_batchnorm: str, device: torch.device, compile_backend: str | None) -> Trainee:
    """A method's reference recipe, built and placed as `fit` builds it, with its own batch stream."""
    config = dataclasses.replace(REFERENCE_CONFIGS[method], batch_size=batch_size, lora_rank=lora_rank,
                                 lora_batchnorm=lora_batchnorm)
    net = place(make_model(config, model, num_labels=num_labels), device)
    optimizer = make_optimizer(config, net)
    scheduler = make_scheduler(config, optimizer, math.ceil(len(split) / batch_size))
    run = torch.compile(net, backend=compile_backend) if compile_backend else net
    return Trainee(method, net, run, optimizer, scheduler,
                   endless_batches(split, batch_size, device, augment=config.augment))


def eval_timings(trainees: dict[str, Trainee], split: ImageSplit, eval_batches: int, rounds: int,
                 device: torch.device) -> dict[str, list[dict]]:
    """Per model, images and seconds of `predict_logits` (batch 64, logits kept on the device until the end), the
    models taking turns; {} when `eval_batches` is 0. LoRA runs twice: "lora" merged into plain convolutions (the
    exported model `predict` runs; on the CPU also what eval mode runs) and "lora_branch" (adapters unmerged)."""
    if eval_batches == 0:
        return {}
    models = {m: to_plain_model(one.net) if m == "lora" else one.net for m, one in trainees.items()}
    if "lora" in trainees:
        set_lora_merging(trainees["lora"].net, False)
        models["lora_branch"] = trainees["lora"].net
    sizes = split_evenly(eval_batches, rounds)
    for net in models.values():
        predict_logits(net, repeated(split, EVAL_BATCH), device, EVAL_BATCH)  # warm-up

    def timed(net: nn.Module) -> Callable[[int], dict]:
        def run(number: int) -> dict:
            part = repeated(split, sizes[number] * EVAL_BATCH)
            synchronize(device)
            started = time.perf_counter()
            predict_logits(net, part, device, EVAL_BATCH)
            return {"images": len(part), "seconds": time.perf_counter() - started}
        return run

    return interleaved({name: timed(net) for name, net in models.items()}, len(sizes))


def merged_vs_branch(net: nn.Module, split: ImageSplit, device: torch.device) -> dict:
    """Max abs and relative difference of a batch's logits with the adapters merged and as a branch, in float32.

    They agree to float rounding, not bitwise: W + ΔW convolved once vs W and the branch convolved apart.
    """
    x, _ = next(batches(split, min(EVAL_BATCH, len(split)), device))
    logits = {}
    with full_precision(), torch.no_grad():
        for merged in (True, False):
            set_lora_merging(net, merged)
            logits[merged] = net(pixel_values=x).logits.float()
    set_lora_merging(net, True)  # how eval() leaves a LoRA model
    difference = (logits[True] - logits[False]).abs().max().item()
    relative = difference / max(logits[False].abs().max().item(), 1e-12)
    return {"merged_max_abs_diff": difference, "merged_relative_diff": relative,
            "merged_matches_branch": relative <= 1e-4}


def eval_lora_extras(evals: dict[str, list[dict]], agreement: dict) -> dict:
    extras = dict(agreement)
    if evals:
        extras.update(eval_branch_images_per_s=rate(evals["lora_branch"]),
                      merged_to_branch_eval=ratio_spread(evals["lora"], evals["lora_branch"]))
    return extras


def table_rows(figures: dict) -> list[tuple[str, str]]:
    """The printed table: per method its figures, then LoRA's against full's."""
    rows = []
    for method, f in figures["methods"].items():
        per_round = ", ".join(f"{r:,.1f}" for r in f["train_images_per_s_per_round"])
        rows += [(f"{method}: train", f"{f['train_images_per_s']:,.1f} images/s (rounds: {per_round})"),
                 (f"{method}: peak memory of a step", f"{f['peak_memory_mb']:,.1f} MB = weights, grads, optimizer "
                  f"{f['state_mb']:,.1f} MB + working {f['peak_working_mb']:,.1f} MB")]
        if f["eval_images_per_s"] is not None:
            rows.append((f"{method}: eval" + (", adapters merged" if method == "lora" else ""),
                         f"{f['eval_images_per_s']:,.1f} images/s"))
        if method == "lora":
            if "eval_branch_images_per_s" in f:
                rows += [("lora: eval, adapters as a branch", f"{f['eval_branch_images_per_s']:,.1f} images/s"),
                         ("lora: merged / branch eval speed", fmt_spread(f["merged_to_branch_eval"]))]
            rows += [("lora: merged outputs = branch (float32)",
                      f"{f['merged_matches_branch']} (max abs diff {f['merged_max_abs_diff']:.2g}, relative "
                      f"{f['merged_relative_diff']:.2g})"),
                     (f"lora: artefact (adapters + head + BatchNorm, rank {figures['settings']['lora_rank']})",
                      f"{f['lora_artifact_bytes']:,} bytes = {f['lora_to_full_checkpoint_ratio']:.1%} of the full "
                      "checkpoint")]
    rows.append(("full checkpoint (safetensors)", f"{figures['full_checkpoint_bytes']:,} bytes"))
    if figures["lora_to_full"]:
        rows += [("LoRA / full train images/s", fmt_spread(figures["lora_to_full"]["train_speed"])),
                 ("LoRA / full peak memory", f"{figures['lora_to_full']['peak_memory_ratio']:.2f}x")]
    return rows


def repeated(split: ImageSplit, count: int) -> ImageSplit:
    """`count` images of the split, its rows over again as often as needed."""
    picked = np.resize(np.arange(len(split)), count)
    return ImageSplit(split.pixels, split.rows[picked], split.labels[picked], split.galaxy_ids[picked], split.task)


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


def checkpoint_bytes(model: nn.Module, results_dir: Path, plain: bool) -> int:
    """Size as safetensors of the model's full checkpoint (`plain`: LoRA folded in), or of what `save_adapters`
    writes of a LoRA model."""
    with tempfile.TemporaryDirectory(dir=bench_dir(results_dir)) as folder:
        path = Path(folder) / "model.safetensors"
        if plain:  # to_plain_model folds LoRA in; a full model it just copies
            save_file({k: v.detach().contiguous() for k, v in to_plain_model(model).state_dict().items()}, str(path))
        else:
            save_adapters(model, path)
        return path.stat().st_size
