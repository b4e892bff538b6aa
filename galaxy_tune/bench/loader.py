"""`bench loader`: images/s from galaxy_tune's pixel cache vs the reference PIL + torchvision loader, epoch by
epoch in turns, and the memory of processes reading the cache at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from ..data.prepare import DataConfig, prepare
from ..errors import GalaxyTuneError
from ..data.loader import IMAGENET_MEAN, IMAGENET_STD, ImageSplit, batches, open_split
from ..data.pixels import image_path
from ..train import pick_device
from .measure import (MB, bench_dir, cache_mapping_fields, environment, fmt_spread, interleaved, print_table,
                      private_bytes, proc_fields, rate, ratio_spread, reset_peak_rss, resolve_data_dir, synchronize,
                      torch_threads)


def bench_loader(data_dir: Path | None = None, results_dir: Path = Path("results"), image_size_px: int = 224,
                 batch_size: int = 64, workers: int = 0, epochs: int = 6, crop_px: int | None = None,
                 readers: int = 2, device: str | None = None, threads: int | None = None) -> dict:
    """Images/s reaching the training loop from galaxy_tune's cache vs the reference PIL + torchvision loader.

    The pipelines take turns epoch by epoch (A, B, A, B, ...); after a first, warm-up round, each round gives a
    ratio of the two, and the figure is their median with its range, so it holds on a busy machine. Also times
    building the cache from scratch, and the private memory of `readers` processes reading the same cache at once
    (its pages are shared page cache, so none of them should hold a copy). `threads` sets torch's intra-op
    threads for both pipelines (a search trial uses --cpus-per-trial, 1 by default).
    """
    if epochs < 2:
        raise GalaxyTuneError(f"--epochs {epochs}: use 2 or more (the first epoch of each pipeline is a warm-up)")
    results_dir = Path(results_dir)
    data_dir = resolve_data_dir(data_dir, results_dir)
    device = pick_device(device)
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
            rounds = timed_epochs_in_turns(pipelines, epochs, device)
            threads = torch.get_num_threads()
        memory = read_concurrently(prepared, batch_size, readers, threads)
        cache_bytes = prepared.cache_path.stat().st_size
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    ours, theirs = rate(rounds["galaxy_tune"]), rate(rounds["reference"])
    speedup = ratio_spread(rounds["galaxy_tune"], rounds["reference"])
    worst_private = max(r["private_mb"] for r in memory)
    figures = {
        "benchmark": "loader",
        "settings": {"data_dir": str(data_dir), "image_size_px": image_size_px, "crop_px": crop_px,
                     "batch_size": batch_size, "workers": workers, "epochs": epochs, "readers": readers,
                     "device": str(device), "torch_threads": threads, "train_images": len(train)},
        "galaxy_tune_images_per_s": ours, "reference_images_per_s": theirs, "speedup": speedup["median"],
        "speedup_range": [speedup["min"], speedup["max"]], "speedup_per_round": speedup["rounds"],
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
                    ("speed-up, epochs in turns", fmt_spread(speedup)),
                    ("speed-up per round", ", ".join(f"{r:.1f}x" for r in speedup["rounds"])),
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


def timed_epochs_in_turns(pipelines: dict[str, Callable[[int], Iterable]], epochs: int,
                          device: torch.device) -> dict[str, list[dict]]:
    """Per pipeline, the images and seconds of each of its epochs 2..N, the pipelines taking turns epoch by epoch.

    The first round warms the page cache, the allocator and the workers, and is left out.
    """
    def epoch_of(name: str) -> Callable[[int], dict]:
        def run(epoch: int) -> dict:
            started = time.perf_counter()
            count = sum(len(y) for _, y in pipelines[name](epoch))
            synchronize(device)
            return {"images": count, "seconds": time.perf_counter() - started}
        return run

    return {name: rounds[1:] for name, rounds in interleaved({n: epoch_of(n) for n in pipelines}, epochs).items()}


# One reader process: the pipeline and nothing else (its parent does the measuring, from /proc/<pid>).
READER = """
import json, sys
from pathlib import Path
import torch
from galaxy_tune.data.prepare import load_prepared
from galaxy_tune.data.loader import batches, open_split
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
    source = str(Path(__file__).resolve().parents[2])  # the folder holding this galaxy_tune, installed or not
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
