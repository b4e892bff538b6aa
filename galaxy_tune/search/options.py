"""What a search was asked to do: `SearchOptions` (the defaults of the CLI and the API), its saved form
`search.json` (read back by `--resume`), and the check that a `--resume auto` command asks for the same search.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .. import layout
from ..data.prepare import DataConfig
from ..errors import GalaxyTuneError
from .strategy import SAMPLERS, SCHEDULERS
from ..train_config import DEVICES

@dataclass(frozen=True)
class SearchOptions:
    """What `galaxy_tune search` was asked to do; the defaults of the CLI and the API are these."""

    method: str
    data: DataConfig  # its seed is the split's and the trials' training seed
    results_dir: Path = Path("results")
    name: str = ""  # default: search-<method>-<time>
    space: Path | None = None  # default: search_spaces/<method>.yaml
    num_samples: int = 20
    max_epochs: int | None = None  # default: the space's epochs
    model: str | None = None  # default: microsoft/resnet-50, falling back to resnet50-random offline
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # default: 1 when the device is cuda, or auto and the cluster has a GPU
    device: str = "auto"  # auto, cpu (trials ask for no GPU) or cuda
    max_concurrent: int | None = None  # default: what the resources allow
    address: str | None = None  # join this Ray cluster instead of starting Ray
    max_failures: int = 2
    checkpoint_every_s: float = 60.0  # a trial checkpoints when this much time passed since its last one
    resume: bool = False
    sampler: str = "tpe"  # a key of strategy.SAMPLERS
    scheduler: str = "asha"  # a key of strategy.SCHEDULERS
    sampler_seed: int | None = None  # default: the data's seed (`bench search` varies it, keeping the split)
    augment: bool = True  # random flips / 90-degree rotations of the training images
    mlflow: str | None = None  # the MLflow tracking URI the runs go to (`tracking`); None: no MLflow
    storage: str | None = None  # --storage URI: Ray's results in object storage (`galaxy_tune.storage`)

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", f"search-{self.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        layout.check_name(self.name)
        for flag, value, low in (("--num-samples", self.num_samples, 1), ("--max-epochs", self.max_epochs, 1),
                                 ("--max-concurrent", self.max_concurrent, 1), ("--max-failures", self.max_failures, 0),
                                 ("--checkpoint-every", self.checkpoint_every_s, 0)):
            if value is not None and value < low:
                raise GalaxyTuneError(f"{flag} {value:g} must be {low} or more")
        if not self.cpus_per_trial > 0:
            raise GalaxyTuneError(f"--cpus-per-trial {self.cpus_per_trial:g} must be more than 0 (e.g. 1, or 0.5)")
        if self.gpus_per_trial is not None and not 0 <= self.gpus_per_trial <= 1:
            raise GalaxyTuneError(f"--gpus-per-trial {self.gpus_per_trial:g}: a trial trains on at most one GPU "
                                  "(no data parallelism); use 1, or a fraction such as 0.5 to share a GPU")
        if self.device not in DEVICES:
            raise GalaxyTuneError(f"--device {self.device!r} is unknown: choose one of {', '.join(DEVICES)}")
        if self.device == "cpu" and self.gpus_per_trial:
            raise GalaxyTuneError(f"--device cpu with --gpus-per-trial {self.gpus_per_trial:g}: drop one of the two")
        if self.device == "cuda" and self.gpus_per_trial == 0:
            raise GalaxyTuneError("--device cuda with --gpus-per-trial 0: a trial without a GPU trains on the CPU; "
                                  "give each trial a GPU or a share of one (e.g. --gpus-per-trial 0.5), or use "
                                  "--device cpu")
        for flag, value, known in (("--sampler", self.sampler, SAMPLERS), ("--scheduler", self.scheduler, SCHEDULERS)):
            if value not in known:
                raise GalaxyTuneError(f"{flag} {value!r} is unknown: choose one of {', '.join(known)}")


def saved_options(experiment: Path) -> SearchOptions:
    """The options of an earlier search, for --resume (which needs no other flag)."""
    saved = experiment / layout.SEARCH_OPTIONS
    if not saved.is_file():
        raise GalaxyTuneError(f"no search to resume at {experiment}: check --name and --results-dir")
    values = json.loads(saved.read_text())
    if "scheduler" not in values:  # search.json before --scheduler: ASHA, or none with early_stopping false
        values["scheduler"] = "asha" if values.get("early_stopping", True) else "fifo"
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    # search.json of versions before options held a DataConfig kept the data settings at the top level.
    data = values.get("data") or {k: values[k] for k in data_fields if k in values}
    fields = {f.name for f in dataclasses.fields(SearchOptions)} - {"data"}
    options = SearchOptions(**{k: v for k, v in values.items() if k in fields},
                            data=DataConfig(**{**{k: v for k, v in data.items() if k in data_fields},
                                               "data_dir": Path(data["data_dir"])}))
    space = {"space": Path(options.space)} if options.space else {}
    return dataclasses.replace(options, results_dir=Path(options.results_dir), **space, resume=True)


# Settings a resumed search takes from its search.json whatever the command says: where it runs may change.
WHERE_IT_RUNS = {"name", "results_dir", "address", "resume", "workers"}
FLAGS = {"image_size_px": "--image-size", "crop_px": "--crop", "checkpoint_every_s": "--checkpoint-every",
         "augment": "--no-augment"}  # a setting's flag, where it is not the setting's own name


def check_unchanged(given: SearchOptions, saved: SearchOptions, experiment: Path) -> None:
    """`--resume auto` of an existing search: refuse a command whose settings differ from the ones the search
    started with, naming the first that differs. Settings the command leaves to a default that depends on the
    machine (the model's fallback, the GPUs per trial) are not compared."""
    def settings(options: SearchOptions) -> dict:
        values = {**dataclasses.asdict(options.data), **dataclasses.asdict(options)}
        del values["data"]
        for name in ("data_dir", "space"):
            values[name] = Path(values[name]).resolve() if values[name] is not None else None
        values["augment"] = not values["augment"]  # as --no-augment says it
        return values

    now, then = settings(given), settings(saved)
    for name, value in now.items():
        if name in WHERE_IT_RUNS or (value is None and name in ("model", "gpus_per_trial")):
            continue
        if value != then.get(name):
            flag = FLAGS.get(name, f"--{name.replace('_', '-')}")
            raise GalaxyTuneError(f"--resume auto: {experiment} was started with {flag} {then.get(name)}, this command "
                                  f"has {value}: run the command that started it, or choose another --name")
