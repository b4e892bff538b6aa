"""Search spaces: YAML files users edit, turned into Optuna define-by-run functions.

A space file holds `params` (per hyperparameter: a fixed value, or `type` loguniform / uniform / int /
categorical with `low`/`high` or `choices`, and optionally `when: {other: value-or-list}`) and
`points_to_evaluate` (the reference recipes the search starts from).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from ..errors import GalaxyTuneError
from ..train_config import TrainConfig

TYPES = ("loguniform", "uniform", "int", "categorical")
SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"  # the repository's search_spaces/


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: its Optuna distribution and the condition under which it exists."""

    name: str
    distribution: optuna.distributions.BaseDistribution
    when: dict[str, tuple] = dataclasses.field(default_factory=dict)

    def active(self, values: dict) -> bool:
        return all(values.get(other) in allowed for other, allowed in self.when.items())


@dataclass(frozen=True)
class SearchSpace:
    """Searched parameters in dependency order, fixed values and the points to evaluate first."""

    params: tuple[Param, ...]
    fixed: dict[str, Any]
    points_to_evaluate: tuple[dict, ...]
    source: str = ""  # the YAML it was read from

    def suggest(self, trial: optuna.Trial) -> dict:
        """Define-by-run: ask the trial for each active parameter, return the fixed values (Ray's config)."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values | self.fixed):
                values[param.name] = suggest(trial, param)
        return dict(self.fixed)

    def distributions(self, config: dict) -> dict[str, optuna.distributions.BaseDistribution]:
        """The distributions of the parameters a trial's config searched (for rebuilding an Optuna study)."""
        return {p.name: p.distribution for p in self.params if p.name in config and p.active(config)}


def suggest(trial: optuna.Trial, param: Param):
    """Ask through the public suggest_* calls (Ray's OptunaSearch records exactly those)."""
    dist = param.distribution
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(param.name, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(param.name, dist.low, dist.high)
    return trial.suggest_float(param.name, dist.low, dist.high, log=dist.log)


def default_space_path(method: str) -> Path:
    return SPACES_DIR / f"{method}.yaml"


def load_space(path: Path, overrides: dict | None = None) -> SearchSpace:
    """Parse and validate a space file; `overrides` fix parameters (e.g. epochs from --max-epochs)."""
    path = Path(path)
    where = f"search space {path}"
    try:
        source = path.read_text()  # read once: it may be a pipe
        raw = yaml.safe_load(source)
    except FileNotFoundError:
        raise GalaxyTuneError(f"{where} does not exist: pass --space with a YAML file like "
                              "search_spaces/lora.yaml") from None
    except yaml.constructor.ConstructorError as err:  # e.g. !!python/object/apply: the safe loader builds none
        raise GalaxyTuneError(f"{where}: YAML tags such as {err.problem.split()[-1]} are not allowed in search "
                              "spaces: write plain values (numbers, strings, lists, mappings)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise GalaxyTuneError(f"{where} is not valid YAML{line}: fix the syntax") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict):
        raise GalaxyTuneError(f"{where} needs a 'params' mapping of hyperparameters")
    unknown_top = sorted(set(raw) - {"params", "points_to_evaluate"})
    if unknown_top:
        raise GalaxyTuneError(f"{where}: unknown key(s) {', '.join(unknown_top)}: use params, points_to_evaluate")
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "seed"}
    params, fixed = [], {}
    for name, spec in raw["params"].items():
        if name not in known:
            raise GalaxyTuneError(f"{where}: unknown parameter '{name}': known ones are {', '.join(sorted(known))}")
        if isinstance(spec, dict):
            params.append(parse_param(where, name, spec))
        else:
            fixed[name] = spec
    if "epochs" in {p.name for p in params}:
        raise GalaxyTuneError(f"{where}: 'epochs' must be a fixed value (it is every trial's budget, ASHA's "
                              "max_t), not a distribution")
    for name, value in (overrides or {}).items():
        params = [p for p in params if p.name != name]
        fixed[name] = value
    names = {p.name for p in params} | set(fixed)
    for param in params:
        for other in param.when:
            if other not in names:
                raise GalaxyTuneError(f"{where}: parameter '{param.name}' has a condition on unknown "
                                      f"parameter '{other}': define '{other}' in params or drop the condition")
    points = raw.get("points_to_evaluate") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise GalaxyTuneError(f"{where}: points_to_evaluate must be a list of mappings")
    points = [{k: v for k, v in point.items() if k not in (overrides or {})} for point in points]  # fixed now
    searched = {p.name: p for p in params}
    for point in points:
        unknown = sorted(set(point) - set(searched))
        if unknown:
            raise GalaxyTuneError(f"{where}: points_to_evaluate sets {', '.join(unknown)}, which is not searched: "
                                  "remove it from the point or make it a searched parameter")
    check_values(where, params, fixed)
    space = SearchSpace(tuple(params), fixed, tuple(points), source)
    for point in points:  # every point and the fixed values must make a valid training config
        TrainConfig.from_dict({**fixed, **point})
    return space


def check_values(where: str, params: list[Param], fixed: dict) -> None:
    """Refuse any value a trial could get that training refuses, by TrainConfig's own validation.

    Each fixed value, each categorical choice and both bounds of each range are checked. TrainConfig's rules are
    intervals and sets, so a range whose bounds pass holds only valid values.
    """
    for name, value in fixed.items():
        _check(where, f"parameter '{name}' is fixed to a value training refuses", {name: value})
    for param in params:
        dist = param.distribution
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            for choice in dist.choices:
                _check(where, f"parameter '{param.name}' has a choice training refuses", {**fixed, param.name: choice})
        else:
            for bound, value in (("low", dist.low), ("high", dist.high)):
                _check(where, f"parameter '{param.name}' has a range training refuses ({bound} {value})",
                       {**fixed, param.name: value})


def _check(where: str, what: str, values: dict) -> None:
    try:
        TrainConfig.from_dict(values)
    except GalaxyTuneError as err:
        raise GalaxyTuneError(f"{where}: {what}: {err}") from None


def parse_param(where: str, name: str, spec: dict) -> Param:
    kind = spec.get("type")
    if kind not in TYPES:
        raise GalaxyTuneError(f"{where}: parameter '{name}' has type {kind!r}: use one of {', '.join(TYPES)}")
    allowed = {"type", "when"} | ({"choices"} if kind == "categorical" else {"low", "high"})
    extra = sorted(set(spec) - allowed)
    if extra:
        raise GalaxyTuneError(f"{where}: parameter '{name}' has unknown key(s) {', '.join(extra)}")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise GalaxyTuneError(f"{where}: parameter '{name}': 'when' must map a parameter to a value or a list")
    when = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise GalaxyTuneError(f"{where}: parameter '{name}' needs a non-empty 'choices' list")
        return Param(name, optuna.distributions.CategoricalDistribution(choices), when)
    if "low" not in spec or "high" not in spec:
        raise GalaxyTuneError(f"{where}: parameter '{name}' needs 'low' and 'high'")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise GalaxyTuneError(f"{where}: parameter '{name}': low and high must be numbers (write 1.0e-4, not 1e-4)")
    if low > high:
        raise GalaxyTuneError(f"{where}: parameter '{name}' has low {low} > high {high}: swap them")
    if kind == "int":
        return Param(name, optuna.distributions.IntDistribution(int(low), int(high)), when)
    if kind == "loguniform" and low <= 0:
        raise GalaxyTuneError(f"{where}: parameter '{name}' is loguniform, so low must be > 0 (got {low})")
    return Param(name, optuna.distributions.FloatDistribution(float(low), float(high), log=kind == "loguniform"), when)
