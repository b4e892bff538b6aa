"""Benchmarks behind `python -m galaxy_tune bench {loader,train,search}`, each against a baseline run alongside.

The machine may be busy with other work, so what matters is a ratio of two figures measured in the same run
(alternately where that is cheap); absolute rates are printed for context. Each `bench_*` function prints a
small table and returns its figures with the settings and library versions that produced them; `write_json`
saves them. Benchmarks are not tests: nothing here asserts a speed.

`measure` holds what they share; `loader`, `training` and `searching` one benchmark each (only `searching`
imports Ray). The names below are imported on first use, so `bench loader` never loads Ray.
"""

from importlib import import_module

_HOMES = {"bench_loader": "loader", "bench_train": "training", "bench_search": "searching", "write_json": "measure"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
