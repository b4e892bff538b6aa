"""What every benchmark measures with: timing of steps and epochs, memory from /proc, the environment, output.

Imports torch, not Ray.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision

from ..demo_data import demo_data_dir
from ..errors import GalaxyTuneError

MB = 1024 * 1024
BENCH_DIR = "bench"  # under --results-dir; one level down, so `retrain` and `report` never mistake it for a search


# ---------------------------------------------------------------- time


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


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads (None: leave the setting alone)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- memory


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
