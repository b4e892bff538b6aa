"""Benchmarks behind `python -m galaxy_tune bench {loader,train,search}`, each against a baseline run alongside.

The machine may be busy with other work, so what matters is a ratio of two figures measured in the same run
(alternately where that is cheap); absolute rates are printed for context. Each `bench_*` function prints a
small table and returns its figures with the settings and library versions that produced them; `write_json`
saves them. Benchmarks are not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import loralib
import numpy as np
import pandas as pd
import ray
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision import transforms

from .demo_data import demo_data_dir
from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    ImageSplit,
    batches,
    image_path,
    load_prepared,
    open_split,
    prepare,
    prepared_folder,
)
from .errors import GalaxyTuneError
from .lora import save_adapters, to_plain_model
from .search import SearchOptions, check_resources, run_search, start_ray
from .train import (METHODS, REFERENCE_CONFIGS, TrainConfig, autocast, make_model, make_optimizer, place,
                    train_step)

MB = 1024 * 1024
BENCH_DIR = "bench"  # under --results-dir; one level down, so `retrain` and `report` never mistake it for a search


# ---------------------------------------------------------------- loader


def bench_loader(data_dir: Path | None = None, results_dir: Path = Path("results"), image_size_px: int = 224,
                 batch_size: int = 64, workers: int = 0, epochs: int = 2, crop_px: int | None = None,
                 readers: int = 2, device: str | None = None, threads: int | None = None) -> dict:
    """Images/s reaching the training loop from galaxy_tune's cache vs the reference PIL + torchvision loader.

    Also times building the cache from scratch, and the private memory of `readers` processes reading the
    same cache at once (its pages are shared page cache, so none of them should hold a copy). `threads` sets
    torch's intra-op threads for both pipelines (a search trial uses --cpus-per-trial, 1 by default).
    """
    if epochs < 2:
        raise GalaxyTuneError(f"--epochs {epochs}: use 2 or more (the first epoch of each pipeline is a warm-up)")
    results_dir = Path(results_dir)
    data_dir = resolve_data_dir(data_dir, results_dir)
    device = resolve_device(device)
    scratch = Path(tempfile.mkdtemp(prefix="loader-", dir=bench_dir(results_dir)))
    try:
        started = time.perf_counter()
        prepared = prepare(DataConfig(data_dir, image_size_px=image_size_px, crop_px=crop_px), scratch)
        build_seconds = time.perf_counter() - started
        cached_images = len(prepared.manifest())
        train = open_split(prepared, "train")
        if len(train) < batch_size:
            raise GalaxyTuneError(f"--batch-size {batch_size} exceeds the {len(train)} training images: lower it")
        reference = reference_loader(data_dir, train, image_size_px, crop_px, batch_size, workers)
        pipelines = {
            "galaxy_tune": lambda epoch: batches(train, batch_size, device, shuffle=True, augment=True, seed=epoch,
                                                  reuse=True),
            "reference": lambda epoch: ((x.to(device, non_blocking=True), y.to(device)) for x, y in reference),
        }
        with torch_threads(threads):
            rates = rates_of_alternate_epochs(pipelines, epochs, device)
            threads = torch.get_num_threads()
        memory = read_concurrently(prepared, batch_size, readers, threads)
        cache_bytes = prepared.cache_path.stat().st_size
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    ours, theirs = rates["galaxy_tune"], rates["reference"]
    worst_private = max(r["private_mb"] for r in memory)
    figures = {
        "benchmark": "loader",
        "settings": {"data_dir": str(data_dir), "image_size_px": image_size_px, "crop_px": crop_px,
                     "batch_size": batch_size, "workers": workers, "epochs": epochs, "readers": readers,
                     "device": str(device), "torch_threads": threads, "train_images": len(train)},
        "galaxy_tune_images_per_s": ours, "reference_images_per_s": theirs, "speedup": ours / theirs,
        "cache_build_seconds": build_seconds, "cache_build_images": cached_images,
        "cache_build_images_per_s": cached_images / build_seconds, "cache_mb": cache_bytes / MB,
        "batch_float_mb": batch_size * 3 * image_size_px**2 * 4 / MB,
        "readers": memory, "max_private_mb_per_reader": worst_private,
        "private_to_cache_ratio": worst_private / (cache_bytes / MB),
        "environment": environment(device),
    }
    print_table(f"bench loader: {image_size_px} px, batch {batch_size}, {len(train)} train images, {device}, "
                f"{threads} torch thread(s)", [
                    ("galaxy_tune (uint8 cache, tensor augment)", f"{ours:,.0f} images/s"),
                    (f"reference (PIL + torchvision, {workers} workers)", f"{theirs:,.0f} images/s"),
                    ("speed-up", f"{ours / theirs:.1f}x"),
                    (f"cache build (prepare, {cached_images} images)",
                     f"{build_seconds:.1f} s = {cached_images / build_seconds:,.0f} images/s"),
                    ("cache size", f"{cache_bytes / MB:.1f} MB"),
                    *[(f"reader {i + 1} of {readers} at once: private memory", (
                        f"+{r['private_mb']:.1f} MB; cache pages mapped {r['cache_mapped_mb']:.1f} MB, shared "
                        f"{r['cache_shared_mb']:.1f} MB, private {r['cache_private_mb']:.1f} MB; peak batch buffers "
                        f"{r['peak_working_mb']:.1f} MB"))
                      for i, r in enumerate(memory)],
                    ("private memory per reader / cache size", f"{worst_private / (cache_bytes / MB):.2f}"),
                ])
    return figures


class ReferenceDataset(torch.utils.data.Dataset):
    """The reference study's input pipeline: every epoch, open each JPEG with PIL and transform it."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform: Callable):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def reference_loader(data_dir: Path, split: ImageSplit, image_size_px: int, crop_px: int | None,
                     batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over the split's JPEGs, built the way the reference study built its own."""
    steps = [transforms.CenterCrop(crop_px)] if crop_px else []
    steps += [transforms.Resize(image_size_px), transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
              transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    dataset = ReferenceDataset([image_path(data_dir, i) for i in split.galaxy_ids], split.labels,
                               transforms.Compose(steps))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


def rates_of_alternate_epochs(pipelines: dict[str, Callable[[int], Iterable]], epochs: int,
                              device: torch.device) -> dict[str, float]:
    """Images/s of each pipeline over epochs 2..N, the pipelines taking turns epoch by epoch.

    Taking turns spreads any load from other processes over all of them, so their ratio stays fair.
    """
    seconds = dict.fromkeys(pipelines, 0.0)
    images = dict.fromkeys(pipelines, 0)
    for epoch in range(epochs):
        for name, epoch_batches in pipelines.items():
            started = time.perf_counter()
            count = sum(len(y) for _, y in epoch_batches(epoch))
            synchronize(device)
            if epoch > 0:  # the first epoch warms the page cache, the allocator and the workers
                seconds[name] += time.perf_counter() - started
                images[name] += count
    return {name: images[name] / seconds[name] for name in pipelines}


# One reader process: the pipeline and nothing else (its parent does the measuring, from /proc/<pid>).
READER = """
import json, sys
from pathlib import Path
import torch
from galaxy_tune.data import batches, load_prepared, open_split
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
split = open_split(load_prepared(Path(args["folder"]), args["image_size_px"], args["crop_px"]), "train")
print("ready", flush=True)
sys.stdin.readline()
for _ in batches(split, args["batch_size"], torch.device("cpu"), shuffle=True, augment=True, reuse=True):
    pass
print("done", flush=True)
sys.stdin.readline()
"""


def read_concurrently(prepared, batch_size: int, readers: int, threads: int) -> list[dict]:
    """Memory figures of `readers` processes each reading one augmented epoch of the cache at the same time.

    The processes start the epoch together and are measured only once all have finished it, so pages of
    the cache that they share show up as shared rather than private.
    """
    args = json.dumps({"folder": str(prepared.folder), "image_size_px": prepared.image_size_px,
                       "crop_px": prepared.crop_px, "batch_size": batch_size, "threads": threads})
    source = str(Path(__file__).resolve().parent.parent)  # this galaxy_tune, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", READER, args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(readers)]
    try:
        for proc in procs:
            expect_line(proc, "ready")
        before = {proc.pid: proc_fields("smaps_rollup", proc.pid) for proc in procs}
        rss_before = {proc.pid: proc_fields("status", proc.pid)["VmRSS"] for proc in procs}
        for proc in procs:
            reset_peak_rss(proc.pid)
        go(procs)
        for proc in procs:
            expect_line(proc, "done")
        figures = [reader_memory(proc.pid, before[proc.pid], rss_before[proc.pid], prepared.cache_path)
                   for proc in procs]
        go(procs)
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=60)
    return figures


def go(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()


def expect_line(proc: subprocess.Popen, prefix: str) -> str:
    """The next line of a reader's stdout that starts with `prefix`; an error if the reader died first."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise GalaxyTuneError(f"a cache reader process exited with status {proc.wait()} (see its error above)")


def reader_memory(pid: int, before: dict[str, int], rss_before: int, cache_path: Path) -> dict:
    """Memory figures (MB) of a reader that has read its epoch, relative to just before it started."""
    after = proc_fields("smaps_rollup", pid)
    cache = cache_mapping_fields(pid, cache_path)
    return {
        # Private memory the epoch left behind: a per-process copy of the cache would show here ...
        "private_mb": (private_bytes(after) - private_bytes(before)) / MB,
        # ... and at its peak: RSS growth less the cache pages mapped (shared page cache), i.e. batch buffers.
        "peak_working_mb": (proc_fields("status", pid)["VmHWM"] - rss_before - cache["Rss"]) / MB,
        "cache_mapped_mb": cache["Rss"] / MB,
        "cache_shared_mb": (cache["Shared_Clean"] + cache["Shared_Dirty"]) / MB,
        "cache_private_mb": private_bytes(cache) / MB,
    }


def private_bytes(fields: dict[str, int]) -> int:
    return fields["Private_Clean"] + fields["Private_Dirty"]


def proc_fields(name: str, pid: int | str = "self") -> dict[str, int]:
    """The `Key: N kB` fields of /proc/<pid>/<name>, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0]) * 1024
    return fields


def cache_mapping_fields(pid: int, cache_path: Path) -> dict[str, int]:
    """The /proc/<pid>/smaps fields (bytes) of that process's mappings of the cache file, summed."""
    totals = dict.fromkeys(("Rss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty"), 0)
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
            inside = line.endswith(str(cache_path))
        elif inside and head and head[0].rstrip(":") in totals:
            totals[head[0].rstrip(":")] += int(head[1]) * 1024
    return totals


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads (None: leave the setting alone)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def reset_peak_rss(pid: int | str = "self") -> None:
    """Restart a process's VmHWM (peak RSS) from its current RSS (Linux: write 5 to /proc/<pid>/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# ---------------------------------------------------------------- train


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


def timed_steps(step: Callable[[torch.Tensor, torch.Tensor], object], stream: Iterator, warmup: int, steps: int,
                device: torch.device) -> tuple[int, float]:
    """(images, seconds) of `steps` calls of `step` on batches drawn from `stream` (data included), after warm-up."""
    for _ in range(warmup):
        step(*next(stream))
    synchronize(device)
    started, images = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(stream)
        step(x, y)
        images += len(y)
    synchronize(device)
    return images, time.perf_counter() - started


def steady_rate(step: Callable, stream: Iterator, warmup: int, steps: int, device: torch.device) -> float:
    """Images/s of `timed_steps`."""
    images, seconds = timed_steps(step, stream, warmup, steps, device)
    return images / seconds


def alternating_rates(variants: dict[str, Callable[[], None]], step: Callable, stream: Iterator, warmup: int,
                      steps: int, device: torch.device, rounds: int = 2) -> dict[str, float]:
    """Images/s of `step` under each variant (a function switching the model to it), the variants taking turns."""
    images, seconds = dict.fromkeys(variants, 0), dict.fromkeys(variants, 0.0)
    for _ in range(rounds):
        for name, switch in variants.items():
            switch()
            done, took = timed_steps(step, stream, max(1, warmup // rounds), max(1, steps // rounds), device)
            images[name] += done
            seconds[name] += took
    return {name: images[name] / seconds[name] for name in variants}


def set_lora_merging(model: nn.Module, merge: bool) -> None:
    """Put a LoRA model in eval mode with B @ A folded into the conv weights (merge) or added at every forward."""
    model.train()  # takes merged adapters back out of the weights
    for module in model.modules():
        if isinstance(module, loralib.ConvLoRA):
            module.merge_weights = merge
    model.eval()


def checkpoint_bytes(model: nn.Module, results_dir: Path, adapters_only: bool = False) -> int:
    """Size of the model saved as safetensors: its full state dict, or (LoRA) what `save_adapters` writes."""
    with tempfile.TemporaryDirectory(dir=bench_dir(results_dir)) as folder:
        path = Path(folder) / "model.safetensors"
        if adapters_only:
            save_adapters(model, path)
        else:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
        return path.stat().st_size


def peak_memory_start(device: torch.device) -> float:
    """Start a peak-memory measurement; returns the memory in use now (MB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / MB
    reset_peak_rss()
    return proc_fields("status")["VmRSS"] / MB


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return proc_fields("status")["VmHWM"] / MB


# ---------------------------------------------------------------- search


def bench_search(data_dir: Path | None = None, results_dir: Path = Path("results"), method: str = "full",
                 num_samples: int = 6, max_epochs: int = 4, model: str = "tiny", image_size_px: int = 32,
                 crop_px: int | None = 256, cpus_per_trial: float = 1.0, seed: int = 0) -> dict:
    """The same trial budget searched with ASHA + TPE and with random search run to the full epoch budget.

    Reports the trial-epochs each spent, the best val accuracy each reached, the epochs each needed to come
    within 1 point of random search's best, and the share of wall time spent outside training epochs.
    """
    results_dir = Path(results_dir)
    data_dir = resolve_data_dir(data_dir, results_dir)
    searches_dir = bench_dir(results_dir) / f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    started_ray = not ray.is_initialized()
    started = time.perf_counter()
    start_ray(None)
    ray_start_seconds = time.perf_counter() - started if started_ray else None
    try:
        runs = {}
        for name, sampler, early_stopping in (("asha_tpe", "tpe", True), ("random", "random", False)):
            options = SearchOptions(method=method, data_dir=data_dir, results_dir=searches_dir, name=name,
                                    num_samples=num_samples, max_epochs=max_epochs, image_size_px=image_size_px,
                                    crop_px=crop_px, model=model, cpus_per_trial=cpus_per_trial, seed=seed,
                                    sampler=sampler, early_stopping=early_stopping)
            experiment = run_search(options)
            concurrency = min(num_samples, check_resources(options))
            runs[name] = search_figures(experiment, concurrency)
    finally:
        if started_ray:
            ray.shutdown()

    best = json.loads((searches_dir / "asha_tpe" / "best.json").read_text())
    prepared = load_prepared(Path(best["data"]["prepared"]), image_size_px, crop_px)
    started = time.perf_counter()
    open_split(prepared, "train")
    open_split(prepared, "val")
    data_open_seconds = time.perf_counter() - started
    started = time.perf_counter()
    make_model(TrainConfig(method=method), best["model"], num_labels=len(prepared.class_names))
    model_build_seconds = time.perf_counter() - started

    target = runs["random"]["best_val_accuracy"] - 0.01
    for run in runs.values():
        run["epochs_to_target"] = epochs_to_reach(run.pop("events"), target)
    asha, rand = runs["asha_tpe"], runs["random"]
    to_target = asha["epochs_to_target"]
    figures = {
        "benchmark": "search",
        "settings": {"method": method, "model": model, "num_samples": num_samples, "max_epochs": max_epochs,
                     "image_size_px": image_size_px, "crop_px": crop_px, "cpus_per_trial": cpus_per_trial,
                     "seed": seed, "data_dir": str(data_dir), "experiments": str(searches_dir)},
        "asha_tpe": asha, "random": rand, "target_val_accuracy": target,
        "epochs_ratio": asha["trial_epochs"] / rand["trial_epochs"],
        "epochs_to_target_ratio": None if to_target is None else to_target / rand["trial_epochs"],
        "ray_start_seconds": ray_start_seconds, "model_build_seconds": model_build_seconds,
        "data_open_seconds": data_open_seconds, "environment": environment(torch.device("cpu")),
    }
    ray_start = "already running" if ray_start_seconds is None else f"{ray_start_seconds:.1f} s"
    print_table(f"bench search: {method}, {model}, {image_size_px} px, {num_samples} trials x {max_epochs} epochs "
                f"({searches_dir})", [
                    ("", "ASHA + TPE  |  random, full budget"),
                    ("trial-epochs used", f"{asha['trial_epochs']}  |  {rand['trial_epochs']}"),
                    ("best val accuracy", f"{asha['best_val_accuracy']:.3f}  |  {rand['best_val_accuracy']:.3f}"),
                    (f"epochs to reach {target:.3f} (random's best - 1 pt)",
                     f"{fmt(asha['epochs_to_target'])}  |  {fmt(rand['epochs_to_target'])}"),
                    ("wall seconds (tuner)", f"{asha['wall_seconds']:.1f}  |  {rand['wall_seconds']:.1f}"),
                    ("share of wall time outside training epochs",
                     f"{asha['overhead_share']:.0%}  |  {rand['overhead_share']:.0%}"),
                    ("in-trial overhead per trial (setup, checkpoints)",
                     f"{asha['in_trial_overhead_seconds']:.2f} s  |  {rand['in_trial_overhead_seconds']:.2f} s"),
                    ("tuner start to first trial running (+-1 s)",
                     " | ".join(fmt_seconds(r["first_trial_start_seconds"]) for r in (asha, rand))),
                    ("ASHA epochs to target / random's total epochs",
                     "not reached" if to_target is None else f"{to_target / rand['trial_epochs']:.2f}"),
                    ("ASHA total epochs / random's total epochs", f"{figures['epochs_ratio']:.2f}"),
                    ("Ray start", ray_start),
                    ("model build / data opening (per trial)",
                     f"{model_build_seconds:.2f} s / {data_open_seconds:.3f} s"),
                ])
    return figures


def search_figures(experiment: Path, concurrency: int) -> dict:
    """Epochs, best accuracy and overheads of one finished search, plus its per-epoch events in time order."""
    trials = pd.read_csv(experiment / "trials.csv")
    wall_seconds = json.loads((experiment / "best.json").read_text())["wall_seconds"]
    events, in_trial, trial_starts = [], [], []
    for path, train_seconds in zip(trials["path"], trials["train_seconds"]):
        results = [json.loads(line) for line in (Path(path) / "result.json").read_text().splitlines() if line]
        events += [(r["timestamp"], r["epoch"], r["val_accuracy"]) for r in results]
        if results:  # Ray's trial clock starts when the trial's code does: setup, epochs, checkpoints, reports
            in_trial.append(results[-1]["time_total_s"] - train_seconds)
            trial_starts.append(results[0]["timestamp"] - results[0]["time_total_s"])
    # search.json is written just before the tuner starts; Ray's timestamps are whole seconds.
    tuner_start = (experiment / "search.json").stat().st_mtime
    train_total = float(trials["train_seconds"].sum())
    return {
        "trials": len(trials), "trial_epochs": int(trials["epochs"].sum()),
        "best_val_accuracy": float(trials["best_val_accuracy"].max()), "wall_seconds": wall_seconds,
        "train_seconds": train_total, "concurrency": concurrency,
        "overhead_share": 1 - train_total / (wall_seconds * concurrency),
        "in_trial_overhead_seconds": float(np.mean(in_trial)) if in_trial else 0.0,
        "first_trial_start_seconds": min(trial_starts) - tuner_start if trial_starts else None,
        "experiment": str(experiment), "events": sorted(events, key=lambda e: (e[0], e[1])),
    }


def epochs_to_reach(events: list[tuple], target: float) -> int | None:
    """Trial-epochs spent (in time order over all trials) until the best val accuracy so far reached `target`."""
    best = -1.0
    for spent, (_, _, accuracy) in enumerate(events, start=1):
        best = max(best, accuracy)
        if best >= target - 1e-9:
            return spent
    return None


# ---------------------------------------------------------------- shared


def resolve_data_dir(data_dir: Path | None, results_dir: Path) -> Path:
    """The given data folder, or the built-in demo data (generated under results_dir on first use)."""
    if data_dir is not None:
        return Path(data_dir)
    return demo_data_dir(results_dir)


def resolve_device(device: str | None) -> torch.device:
    """The named device, or CUDA when one is visible, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GalaxyTuneError(f"--device {device}: no CUDA device is visible here; use --device cpu")
    return torch.device(device)


def bench_dir(results_dir: Path) -> Path:
    folder = Path(results_dir) / BENCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    """What the figures were measured on."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model_lines = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
        name = model_lines[0].partition(":")[2].strip() if model_lines else platform.processor()
    return {"device": str(device), "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "platform": platform.platform(),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def fmt(value: int | None) -> str:
    return "not reached" if value is None else str(value)


def fmt_seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} s"


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    print(f"\n{title}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    sys.stdout.flush()


def write_json(figures: dict, path: Path) -> None:
    """Write a benchmark's figures as indented JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- command line


def add_bench_parser(commands) -> None:
    """Add `bench {loader,train,search}` to the CLI's subparsers."""
    bench = commands.add_parser("bench", help="measure the data path, training speed and the search")
    kinds = bench.add_subparsers(dest="benchmark", required=True)

    def common(p, image_size: int, crop: int | None):
        p.add_argument("--data-dir", type=Path, help="Kaggle folder; default: the built-in demo data")
        p.add_argument("--results-dir", type=Path, default=Path("results"), help="run outputs (default: results)")
        p.add_argument("--image-size", type=int, default=image_size, help=f"pixels per side (default {image_size})")
        p.add_argument("--crop", type=int, default=crop, help="centre-crop the 424 px frame first "
                       f"(default: {crop or 'none'})")
        p.add_argument("--json", type=Path, help="also write the figures to this JSON file")

    p = kinds.add_parser("loader", help="images/s of galaxy_tune's data path vs the reference PIL DataLoader")
    common(p, 224, None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the reference pipeline")
    p.add_argument("--epochs", type=int, default=2, help="epochs per pipeline, the first a warm-up (default 2)")
    p.add_argument("--readers", type=int, default=2, help="concurrent processes for the memory check")
    p.add_argument("--device", help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--threads", type=int, help="torch threads of both pipelines (default: torch's, one per core)")
    p.set_defaults(run=lambda a: save_if_asked(a, bench_loader(
        a.data_dir, a.results_dir, image_size_px=a.image_size, batch_size=a.batch_size, workers=a.workers,
        epochs=a.epochs, crop_px=a.crop, readers=a.readers, device=a.device, threads=a.threads)))

    p = kinds.add_parser("train", help="training and eval images/s and peak memory of one model")
    common(p, 224, None)
    p.add_argument("--model", default="resnet50-random", help="Hub id or folder, resnet50-random or tiny")
    p.add_argument("--method", choices=METHODS, default="full")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, help="timed steps (default: 50 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps (default: 10 on CUDA, 1 on CPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.set_defaults(run=lambda a: save_if_asked(a, bench_train(
        a.data_dir, a.results_dir, model=a.model, image_size_px=a.image_size, crop_px=a.crop,
        batch_size=a.batch_size, method=a.method, lora_rank=a.lora_rank, steps=a.steps, warmup=a.warmup,
        device=a.device, compile_model=a.compile, threads=a.threads)))

    p = kinds.add_parser("search", help="ASHA + TPE vs random search with the full epoch budget, same trials")
    common(p, 32, 256)
    p.add_argument("--method", choices=METHODS, default="full")
    p.add_argument("--model", default="tiny", help="backbone of every trial (default: tiny)")
    p.add_argument("--num-samples", type=int, default=6, help="trials per search (default 6)")
    p.add_argument("--max-epochs", type=int, default=4, help="epoch budget per trial (default 4)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=lambda a: save_if_asked(a, bench_search(
        a.data_dir, a.results_dir, method=a.method, num_samples=a.num_samples, max_epochs=a.max_epochs,
        model=a.model, image_size_px=a.image_size, crop_px=a.crop, cpus_per_trial=a.cpus_per_trial, seed=a.seed)))


def save_if_asked(args, figures: dict) -> None:
    """Write the figures to --json FILE when given."""
    if args.json:
        write_json(figures, args.json)
        print(f"figures written to {args.json}")
