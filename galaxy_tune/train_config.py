"""A training run's hyperparameters (`TrainConfig`), the reference study's recipes, and their choices.

No torch here: the search's driver checks, proposes and records configs without importing what trains them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import GalaxyTuneError
from .models.choices import BATCHNORM_MODES, LORA_TARGETS, SCALINGS, STAGES

METHODS = ("full", "lora")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "step", "onecycle", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of one training run; the names are the same in YAML spaces, Ray and best.json."""

    method: str = "full"
    # The backbone, when a search space chooses it (e.g. search_spaces/backbones.yaml); "": the command's --model.
    model: str = ""
    lr: float = 1e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    epochs: int = 7
    batch_size: int = 32
    label_smoothing: float = 0.0
    # Full fine-tuning, layer-wise: the stem and the first stages frozen (5: the head alone, a linear probe),
    # and each stage's lr scaled by lr_decay per stage below the head (1: one lr for all).
    frozen_stages: int = 0
    lr_decay: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: str = "bottleneck"
    lora_stages: str = "1,2,3,4"  # the backbone's stages that get adapters
    lora_batchnorm: str = "stats"  # frozen, stats (running statistics update) or affine (γ, β train too)
    lora_scaling: str = "standard"  # alpha / r, or rslora: alpha / √r
    lora_plus_ratio: float = 1.0  # LoRA+: the B matrices' lr over the A matrices' (1: plain LoRA)
    augment: bool = True
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build and validate a config from plain values (a Ray config, a YAML point, best.json)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise GalaxyTuneError(f"unknown hyperparameter(s) {', '.join(unknown)}: known ones are "
                                  f"{', '.join(fields)}")
        typed = {}
        if isinstance(values.get("lora_batchnorm"), bool):  # configs before the three modes: on/off
            values = {**values, "lora_batchnorm": "affine" if values["lora_batchnorm"] else "stats"}
        for name, value in values.items():
            kind = type(fields[name].default)
            try:
                typed[name] = kind(value) if kind is not bool else bool(value)
            except (TypeError, ValueError):
                raise GalaxyTuneError(f"hyperparameter {name}={value!r} must be a {kind.__name__}") from None
        config = cls(**typed)
        config.validate()
        return config

    def validate(self) -> None:
        for name, value, allowed in [("method", self.method, METHODS), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("scheduler", self.scheduler, SCHEDULERS),
                                     ("lora_targets", self.lora_targets, LORA_TARGETS),
                                     ("lora_batchnorm", self.lora_batchnorm, BATCHNORM_MODES),
                                     ("lora_scaling", self.lora_scaling, SCALINGS)]:
            if value not in allowed:
                raise GalaxyTuneError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        for name in ("lr", "epochs", "batch_size", "step_size", "lora_rank", "lora_alpha", "lr_decay",
                     "lora_plus_ratio"):
            if not getattr(self, name) > 0:
                raise GalaxyTuneError(f"hyperparameter {name}={getattr(self, name)!r} must be positive")
        if not 0 <= self.frozen_stages <= STAGES + 1:
            raise GalaxyTuneError(f"frozen_stages={self.frozen_stages} must be 0 (none) to {STAGES + 1} (the whole "
                                  "backbone: a linear probe)")
        if not 0 <= self.label_smoothing < 1:
            raise GalaxyTuneError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        self.stages()
        if self.weight_decay < 0 or not 0 < self.gamma <= 1:
            raise GalaxyTuneError(f"weight_decay={self.weight_decay} must be >= 0 and gamma={self.gamma} in (0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stages(self) -> tuple[int, ...]:
        """lora_stages as stage numbers, e.g. "3,4" -> (3, 4)."""
        try:
            stages = tuple(sorted({int(part) for part in self.lora_stages.split(",")}))
        except ValueError:
            stages = ()
        if not stages or not set(stages) <= set(range(1, STAGES + 1)):
            raise GalaxyTuneError(f"lora_stages={self.lora_stages!r} must list the backbone's stages 1-{STAGES}, "
                                  "e.g. '3,4'")
        return stages

    def searched(self) -> dict:
        """The hyperparameters that matter for this method (LoRA ones dropped for full fine-tuning)."""
        values = self.to_dict()
        if not self.model:
            values.pop("model")
        if self.method == "full":
            values = {k: v for k, v in values.items() if not k.startswith("lora_")}
        else:  # LoRA freezes the backbone itself; its stages are lora_stages
            values = {k: v for k, v in values.items() if k != "frozen_stages"}
        if self.scheduler != "step":
            values = {k: v for k, v in values.items() if k not in ("step_size", "gamma")}
        return values


# The reference study's recipes: the starting points of every search and the fallback of the retrain.
REFERENCE_CONFIGS = {
    "full": TrainConfig(method="full", lr=1e-4, weight_decay=1e-4, optimizer="adamw", scheduler="cosine", epochs=7),
    "lora": TrainConfig(method="lora", lr=1e-3, weight_decay=0.0, optimizer="adam", scheduler="step",
                        step_size=10, gamma=0.1, epochs=10),
}


DEVICES = ("auto", "cpu", "cuda")
