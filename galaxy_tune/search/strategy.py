"""What proposes each trial's config and what stops weak trials: `--sampler` (Optuna) and `--scheduler` (Ray Tune).

Each optimises the task's val metric in its direction. What each achieves is measured by `bench search`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import optuna
from ray.tune.schedulers import ASHAScheduler, AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from ..data.tasks import Task

if TYPE_CHECKING:
    from .options import SearchOptions

SAMPLERS = {  # --sampler: what proposes each trial's config
    "tpe": "Optuna's TPE, multivariate over grouped parameters, constant liar when trials run at once",
    "tpe-independent": "Optuna's TPE one parameter at a time, no constant liar (galaxy_tune's earlier default)",
    "random": "Optuna's random sampler",
}
SCHEDULERS = {  # --scheduler: what stops weak trials early
    "asha": "Ray's ASHA: rungs at 1, 2, 4, ... epochs, the better half of each rung continues",
    "hyperband": "Ray's asynchronous HyperBand: ASHA in 3 brackets, whose first rungs are 1, 2 and 4 epochs",
    "fifo": "none: every trial runs its full epoch budget",
}


def uses_constant_liar(options: SearchOptions, max_concurrent: int) -> bool:
    """TPE (multivariate) treats running trials as done with a bad value, so that trials proposed while others run
    spread out instead of repeating the pending ones: whenever more than one trial runs at once."""
    return options.sampler == "tpe" and min(options.num_samples, max_concurrent) > 1


def make_sampler(options: SearchOptions, max_concurrent: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of `--sampler` (SAMPLERS).

    TPE starts modelling after a third of the budget (Optuna's default waits 10 trials, all of a small search);
    `group` splits the conditional space (step_size, gamma only under the step scheduler) into the parameter sets
    that occur together, each modelled jointly.
    """
    seed = options.data.seed if options.sampler_seed is None else options.sampler_seed
    startup = max(2, options.num_samples // 3)
    if options.sampler == "tpe":
        with warnings.catch_warnings():  # multivariate, group and constant_liar are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True,
                                              constant_liar=uses_constant_liar(options, max_concurrent))
    if options.sampler == "tpe-independent":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=seed)


def make_scheduler(name: str, max_epochs: int, task: Task) -> TrialScheduler:
    """The Ray Tune trial scheduler of `--scheduler` (SCHEDULERS); all of them resume with `Tuner.restore`."""
    if name == "fifo":
        return FIFOScheduler()
    rungs = {"time_attr": "training_iteration", "metric": task.val_metric, "mode": task.mode, "max_t": max_epochs,
             "grace_period": 1, "reduction_factor": 2}
    if name == "hyperband":
        return AsyncHyperBandScheduler(**rungs, brackets=3)
    return ASHAScheduler(**rungs)
