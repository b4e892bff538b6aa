"""What every benchmark measures with: timing of steps and epochs, memory from /proc, the environment, output.

Imports torch, not Ray.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision

from ..data.demo import demo_data_dir

MB = 1024 * 1024
# glibc's malloc_trim(0) hands freed heap pages back to the system (None elsewhere, e.g. on musl or macOS).
MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c") or None), "malloc_trim", None)
BENCH_DIR = "bench"  # under --results-dir; one level down, so `retrain` and `report` never mistake it for a search


# ---------------------------------------------------------------- time


def interleaved(runs: dict[str, Callable[[int], dict]], rounds: int) -> dict[str, list[dict]]:
    """Call every run once per round, the runs taking turns (A, B, A, B, ...); per run, what each round returned.

    A run times one round of its work and returns at least `images` and `seconds`. Taking turns spreads any load
    from other processes over all runs, so ratios of rounds measured side by side stay fair on a busy machine.
    """
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for number in range(rounds):
        for name, run in runs.items():
            results[name].append(run(number))
    return results


def rate(rounds: list[dict]) -> float:
    """Images/s over all of a run's rounds."""
    return sum(r["images"] for r in rounds) / sum(r["seconds"] for r in rounds)


def ratio_spread(numerator: list[dict], denominator: list[dict]) -> dict:
    """The ratio of two runs' images/s round by round: its median, its range and every round's."""
    ratios = [(a["images"] / a["seconds"]) / (b["images"] / b["seconds"]) for a, b in zip(numerator, denominator)]
    return {"median": float(statistics.median(ratios)), "min": min(ratios), "max": max(ratios), "rounds": ratios}


def fmt_spread(spread: dict) -> str:
    """`3.2x (median of 5 rounds, range 2.9-3.4x)`."""
    count = len(spread["rounds"])
    return (f"{spread['median']:.2f}x (median of {count} round{'s' * (count != 1)}, range "
            f"{spread['min']:.2f}-{spread['max']:.2f}x)")


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` steps as `parts` round sizes differing by at most one (every round gets at least one)."""
    parts = max(1, min(parts, total))
    return [total // parts + (i < total % parts) for i in range(parts)]


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads (None: leave the setting alone)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def full_precision() -> Iterator[None]:
    """Run the block in true float32: no TF32 in CUDA matmuls and convolutions (it keeps 10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- memory


def peak_memory_start(device: torch.device) -> float:
    """Start a peak-memory measurement; returns the memory in use now (MB).

    On the CPU, freed heap memory is first handed back to the system (glibc's malloc_trim), so that the RSS
    counts live memory only and the peak that follows is measured from there.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / MB
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    reset_peak_rss()
    return proc_fields("status")["VmRSS"] / MB


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return proc_fields("status")["VmHWM"] / MB


def tensors_mb(tensors) -> float:
    """MB held by the storages of `tensors` (each storage counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}
    return sum(storages.values()) / MB


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


def private_bytes(fields: dict[str, int]) -> int:
    return fields["Private_Clean"] + fields["Private_Dirty"]


def reset_peak_rss(pid: int | str = "self") -> None:
    """Restart a process's VmHWM (peak RSS) from its current RSS (Linux: write 5 to /proc/<pid>/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# ---------------------------------------------------------------- inputs and outputs


def resolve_data_dir(data_dir: Path | None, results_dir: Path) -> Path:
    """The given data folder, or the built-in demo data (generated under results_dir on first use)."""
    if data_dir is not None:
        return Path(data_dir)
    return demo_data_dir(results_dir)


def bench_dir(results_dir: Path) -> Path:
    folder = Path(results_dir) / BENCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
