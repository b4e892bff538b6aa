"""Batches of a prepared split on the training device: the memory-mapped uint8 cache in, normalised tensors out.

No JPEG is decoded here: rows are gathered from the pixel cache that `data.prepare` wrote, moved to the device,
turned (flips / 90° rotations), converted and normalised there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .prepare import Prepared
from .tasks import DEFAULT_TASK, get_task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSplit:
    """One split of the cache: memory-mapped pixels (no copy) and their targets (labels, or vote fractions)."""

    pixels: np.ndarray  # (N_all, 3, H, W) uint8 memmap
    rows: np.ndarray  # rows of this split
    labels: np.ndarray  # (N,) class labels, or (N, outputs) targets of a regression task
    galaxy_ids: np.ndarray
    task: str = DEFAULT_TASK

    def __len__(self) -> int:
        return len(self.rows)


def open_split(prepared: Prepared, split: str) -> ImageSplit:
    return open_splits(prepared, split)[0]


def open_splits(prepared: Prepared, *splits: str) -> list[ImageSplit]:
    """The named splits, from one read of the manifest (kaggle-votes': 37 float columns per galaxy)."""
    manifest = prepared.manifest()
    pixels = np.load(prepared.cache_path, mmap_mode="r")
    labels, ids = get_task(prepared.task).labels(manifest), manifest["GalaxyID"].to_numpy()
    names = manifest["split"].to_numpy()
    return [ImageSplit(pixels, rows, labels[rows], ids[rows], prepared.task)
            for rows in (np.flatnonzero(names == split) for split in splits)]


def batches(split: ImageSplit, batch_size: int, device: torch.device, *, shuffle: bool = False,
            augment: bool = False, seed: int = 0, reuse: bool = False, prefetch: bool | None = None,
            normalisation: tuple = (IMAGENET_MEAN, IMAGENET_STD)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float batches (N, 3, H, W), normalised by `normalisation` (the backbone's pretrained mean and std), and labels
    on `device`; seeded shuffling and dihedral augmentation.

    The loop never decodes a JPEG: the uint8 pixels are read from the memory-mapped cache, moved to the device,
    and turned, converted and normalised there in batched tensor ops (channels_last on CUDA). An augmented
    batch is grouped by flip/rotation, so each of the 8 is one strided copy that also converts to float. The
    same seed gives the same batches, which is what makes resumed training reproducible.

    With `reuse`, every batch is written into the same tensor (no allocation per batch; on the CPU that is a
    page fault per 4 KB of a 38 MB batch at 224 px): a batch is then valid only until the next one is drawn.
    With `prefetch` (the default on CUDA), a background thread gathers the next batch's rows while the current
    one trains, and on CUDA copies them to the device on a side stream; the batches are the same.
    """
    plan = batch_plan(len(split), batch_size, shuffle, augment, seed)
    if not plan:
        return
    # The epoch's labels in batch order, moved to the device in one copy.
    labels = torch.from_numpy(split.labels[np.concatenate([picked for picked, _ in plan])]).to(device)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in normalisation)
    scale, shift = 1 / (255 * std), -mean / std  # (pixel / 255 - mean) / std as one multiply-add
    height, width = split.pixels.shape[2:]
    raws = (prefetched_pixels if (device.type == "cuda" if prefetch is None else prefetch) else gathered_pixels)(
        split, [picked for picked, _ in plan], device)
    kept, first = None, 0
    for (picked, element), raw in zip(plan, raws):
        if reuse and kept is not None and len(kept) >= len(raw):
            x = kept[:len(raw)]
        else:
            x = empty_batch((len(raw), 3, height, width), device)
            kept = x if reuse else None
        edges = np.flatnonzero(np.diff(element)) + 1
        for start, stop in zip([0, *edges], [*edges, len(element)]):  # one strided copy per flip/rotation
            run = x[start:stop].copy_(orient(raw[start:stop], int(element[start])))
            if device.type == "cpu":  # normalised run by run while it is in the CPU's cache
                run.mul_(scale).add_(shift)
        if device.type != "cpu":  # on a GPU, one pass over the whole batch
            x.mul_(scale).add_(shift)
        yield x, labels[first:first + len(picked)]
        first += len(picked)


def batch_plan(count: int, batch_size: int, shuffle: bool, augment: bool,
               seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per batch: the split's rows it holds and each row's flip/rotation, grouped into one run per flip/rotation."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(count, generator=generator).numpy() if shuffle else np.arange(count)
    plan = []
    for start in range(0, count, batch_size):
        picked = order[start:start + batch_size]
        element = (torch.randint(0, 8, (len(picked),), generator=generator).numpy() if augment
                   else np.zeros(len(picked), dtype=np.int64))
        grouped = np.lexsort((picked, element))  # one run per flip/rotation; rows ascending in each run
        plan.append((picked[grouped], element[grouped]))
    return plan


def gathered_pixels(split: ImageSplit, picks: list[np.ndarray], device: torch.device) -> Iterator[torch.Tensor]:
    """The uint8 pixels of each batch, gathered from the cache on this thread and moved to `device`."""
    for picked in picks:
        yield torch.from_numpy(split.pixels[split.rows[picked]]).to(device)


def prefetched_pixels(split: ImageSplit, picks: list[np.ndarray], device: torch.device) -> Iterator[torch.Tensor]:
    """`gathered_pixels`, with the next batch gathered by a background thread while the caller uses this one.

    Two host buffers take turns (pinned on CUDA, so the copy is asynchronous). On CUDA each copy runs on a side
    stream and records an event; a buffer is overwritten only once the copy out of it has finished.
    """
    cuda = device.type == "cuda"
    shape = (max(len(p) for p in picks), *split.pixels.shape[1:])
    buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    copied: list = [None, None]  # per buffer: the CUDA event of the last copy out of it
    stream = torch.cuda.Stream(device) if cuda else None

    def gather(index: int) -> torch.Tensor:
        buffer = buffers[index % 2][:len(picks[index])]
        if copied[index % 2] is not None:
            copied[index % 2].synchronize()
        np.take(split.pixels, split.rows[picks[index]], axis=0, out=buffer.numpy(), mode="clip")  # rows are valid
        return buffer

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="galaxy-tune-prefetch") as pool:
        pending = pool.submit(gather, 0)
        for index in range(len(picks)):
            host = pending.result()
            if index + 1 < len(picks):
                pending = pool.submit(gather, index + 1)
            if not cuda:  # the caller copies it out before the next-but-one gather writes into it
                yield host if device.type == "cpu" else host.to(device)
                continue
            with torch.cuda.stream(stream):
                raw = host.to(device, non_blocking=True)
                copied[index % 2] = torch.cuda.Event()
                copied[index % 2].record(stream)
            torch.cuda.current_stream(device).wait_stream(stream)
            raw.record_stream(torch.cuda.current_stream(device))  # allocated on the side stream, used on this one
            yield raw


def empty_batch(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An uninitialised float batch: channels_last on CUDA; on the CPU, memory that numpy allocates.

    numpy asks Linux for transparent huge pages for large arrays and torch's CPU allocator does not, so the
    first write to a fresh 38 MB batch (64 images at 224 px) takes ~20 page faults instead of ~9,400.
    """
    if device.type == "cpu":
        return torch.from_numpy(np.empty(shape, dtype=np.float32))
    return torch.empty(shape, device=device, memory_format=torch.channels_last)


def orient(x: torch.Tensor, element: int, dims: tuple[int, int] = (2, 3)) -> torch.Tensor:
    """One of the 8 flips/rotations of the square (element 0..7, 0 = as is, no copy) over the pixel `dims`."""
    if element == 0:
        return x
    turned = x.rot90(element % 4, dims=dims)
    return turned.flip(dims[1]) if element >= 4 else turned
