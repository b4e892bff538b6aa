"""Benchmarks behind `python -m galaxy_tune bench {prepare,loader,train,search}`, each against a baseline run alongside,
and `bench gpu`, which checks a GPU machine in one go.

The machine may be busy with other work, so what matters is a ratio of two figures measured in the same run, in
turns (A, B, A, B, ...) and reported as the median of the rounds' ratios with its range; absolute rates are
printed for context. Each `bench_*` function prints a small table and returns its figures with the settings and
library versions that produced them; `write_json` saves them. Benchmarks are not tests: nothing here asserts a
speed (`bench gpu` reports its targets as PASS/FAIL, and fails no command for them).

`measure` holds what they share; `preparing`, `loader`, `training` and `searching` one benchmark each, `gpu` the GPU check,
whose checks are in `gpu_training` and `gpu_runs` (only `searching` and `gpu_runs` import Ray). The names below
are imported on first use, so `bench loader` never loads Ray.
"""

from importlib import import_module

_HOMES = {"bench_loader": "loader", "bench_train": "training", "bench_search": "searching", "bench_gpu": "gpu",
          "bench_prepare": "preparing", "write_json": "measure"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
