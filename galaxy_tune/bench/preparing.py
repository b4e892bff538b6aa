"""`bench prepare`: images/s of `prepare` (split, then decoding every image once into the pixel cache) with one
decoding process and with one per core, in turns, each round into a fresh folder."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..data.prepare import DataConfig, prepare
from ..data.pixels import process_pool, usable_cores
from ..errors import GalaxyTuneError
from ..data.kaggle import IMAGES_DIR
from .measure import (MB, bench_dir, environment, fmt_spread, interleaved, print_table, rate, ratio_spread,
                      resolve_data_dir)


def bench_prepare(data_dir: Path | None = None, results_dir: Path = Path("results"), image_size_px: int = 224,
                  crop_px: int | None = None, rounds: int = 3, workers: int | None = None) -> dict:
    """Images/s of a whole `prepare` from scratch with 1 decoding process vs `workers` (default: one per core).

    The two take turns (1, N, 1, N, ...), each round preparing into a fresh folder, so every round decodes every
    image; the speed-up is the median of the rounds' ratios with its range. The pool's start-up is timed apart
    first (the fork server that every later pool forks from, then a pool from the running server), so the rounds
    measure what each later `prepare` pays. The JPEGs are read once before timing, so that no run is the one
    that pulls them from disk into the page cache.
    """
    if rounds < 1:
        raise GalaxyTuneError(f"--rounds {rounds} must be 1 or more")
    if workers is not None and workers < 2:
        raise GalaxyTuneError(f"--workers {workers}: compare 1 process with 2 or more")
    count = workers or usable_cores()
    if count < 2:
        raise GalaxyTuneError("this machine has one core: pass --workers 2 or more to compare anyway")
    results_dir = Path(results_dir)
    data_dir = Path(resolve_data_dir(data_dir, results_dir)).resolve()
    DataConfig(data_dir, image_size_px=image_size_px, crop_px=crop_px)  # refuses bad settings before any work
    image_bytes = sum(path.stat().st_size for path in warm_page_cache(data_dir))
    pool_start = {"first_s": time_pool_start(count), "warm_s": time_pool_start(count)}
    scratch = Path(tempfile.mkdtemp(prefix="prepare-", dir=bench_dir(results_dir)))

    def run(processes: int):
        def one_round(number: int) -> dict:
            out = scratch / f"{processes}-workers-round{number}"
            started = time.perf_counter()
            prepared = prepare(DataConfig(data_dir, image_size_px=image_size_px, crop_px=crop_px,
                                          workers=processes), out)
            seconds = time.perf_counter() - started
            figures = {"images": len(prepared.manifest()), "seconds": seconds,
                       "cache_mb": prepared.cache_path.stat().st_size / MB}
            shutil.rmtree(out)  # the next round starts from nothing again; the disk holds one cache at a time
            return figures
        return one_round

    names = {1: "1 worker", count: f"{count} workers"}
    try:
        measured = interleaved({name: run(processes) for processes, name in names.items()}, rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    one, many = measured[names[1]], measured[names[count]]
    speedup = ratio_spread(many, one)
    figures = {
        "benchmark": "prepare",
        "settings": {"data_dir": str(data_dir), "image_size_px": image_size_px, "crop_px": crop_px,
                     "rounds": rounds, "workers": count, "images": one[0]["images"],
                     "jpeg_mb": image_bytes / MB, "cache_mb": one[0]["cache_mb"]},
        "one_worker_images_per_s": rate(one), "all_workers_images_per_s": rate(many),
        "speedup": speedup["median"], "speedup_range": [speedup["min"], speedup["max"]],
        "speedup_per_round": speedup["rounds"], "pool_start_s": pool_start,
        "rounds": {name: measured[name] for name in names.values()},
        "environment": environment(torch.device("cpu")),
    }
    per_round = {name: ", ".join(f"{r['images'] / r['seconds']:,.0f}" for r in measured[name])
                 for name in names.values()}
    print_table(f"bench prepare: {one[0]['images']:,} images at {image_size_px} px "
                f"(crop {crop_px or 'none'}, cache {one[0]['cache_mb']:,.0f} MB), {rounds} round(s) in turns", [
                    ("1 worker", f"{rate(one):,.0f} img/s ({sum(r['seconds'] for r in one) / rounds:.2f} s a "
                     f"prepare; rounds: {per_round[names[1]]})"),
                    (names[count], f"{rate(many):,.0f} img/s ({sum(r['seconds'] for r in many) / rounds:.2f} s "
                     f"a prepare; rounds: {per_round[names[count]]})"),
                    ("speed-up", fmt_spread(speedup)),
                    ("pool start", f"{pool_start['first_s']:.2f} s with the fork server, then "
                     f"{pool_start['warm_s']:.2f} s (not in the rounds)"),
                    ("machine", f"{usable_cores()} usable cores; load average {load_average()}"),
                ])
    return figures


def warm_page_cache(data_dir: Path) -> list[Path]:
    """Read every JPEG once, so that the timed rounds all find them in the page cache; returns their paths."""
    paths = sorted((data_dir / IMAGES_DIR).glob("*.jpg"))
    for path in paths:
        path.read_bytes()
    return paths


def time_pool_start(workers: int) -> float:
    """Seconds to start the decoding pool and run `workers` trivial tasks on it."""
    started = time.perf_counter()
    with process_pool(workers) as pool:
        list(pool.map(abs, range(workers)))
    return time.perf_counter() - started


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"
