"""galaxy_tune: Ray Tune + Optuna search over full and LoRA fine-tuning of ResNet-50 on Galaxy Zoo.

The Python API mirrors the command line: `galaxy_tune.search(...)`, `galaxy_tune.retrain(...)`,
`galaxy_tune.predict(...)` and `galaxy_tune.prepare(...)`.

The API is imported on first use (PEP 562), not with the package: a trial's worker process imports
`galaxy_tune.search.trainable`, and should not pay for Optuna, matplotlib and the rest of the API on every trial start.
"""

__all__ = ["predict", "prepare", "retrain", "search"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'galaxy_tune' has no attribute {name!r}")
    import importlib

    from . import api

    # Importing a submodule makes it an attribute of the package: the submodules named like API functions
    # (search, retrain, predict) are imported first, so the functions take their place for good.
    for module in ("search", "retrain", "predict"):
        importlib.import_module(f"{__name__}.{module}")
    globals().update({n: getattr(api, n) for n in __all__})
    return globals()[name]
