"""galaxy_tune: Ray Tune + Optuna search over full and LoRA fine-tuning of ResNet-50 on Galaxy Zoo.

The Python API mirrors the command line: `galaxy_tune.search(...)`, `galaxy_tune.retrain(...)`,
`galaxy_tune.predict(...)` and `galaxy_tune.prepare(...)`.
"""

from .api import predict, prepare, retrain, search

__all__ = ["predict", "prepare", "retrain", "search"]
