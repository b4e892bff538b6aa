"""Search spaces: the shipped YAML files, conditional parameters, and clear errors for broken files."""

import re

import optuna
import pytest

from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.search.space import default_space_path, load_space
from galaxy_tune.train import REFERENCE_CONFIGS, TrainConfig


@pytest.mark.parametrize("method", ["full", "lora"])
def test_shipped_spaces_start_from_the_reference_recipe(method):
    space = load_space(default_space_path(method), {"method": method})
    searched = {p.name for p in space.params}
    assert {"lr", "scheduler"} <= searched
    assert ({"lora_rank", "lora_alpha"} if method == "lora" else {"weight_decay"}) <= searched
    point = TrainConfig.from_dict({**space.fixed, **space.points_to_evaluate[0]})
    reference = REFERENCE_CONFIGS[method]
    for name in ("lr", "optimizer", "scheduler"):
        assert getattr(point, name) == getattr(reference, name)


def test_define_by_run_searches_step_parameters_only_with_the_step_scheduler():
    space = load_space(default_space_path("lora"), {"method": "lora", "epochs": 3})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = set()
    for _ in range(40):
        trial = study.ask()
        fixed = space.suggest(trial)
        params = trial.params
        assert fixed["epochs"] == 3 and fixed["method"] == "lora"
        assert ("step_size" in params) == (params["scheduler"] == "step")
        assert space.distributions(params | fixed).keys() == params.keys()
        TrainConfig.from_dict({**params, **fixed})
        seen.add(params["scheduler"])
        study.tell(trial, 0.5)
    assert seen == {"cosine", "onecycle", "step", "constant"}


@pytest.mark.parametrize("text, culprit", [
    ("params: {lr: {type: loguniform, low: 1.0e-4, high: [}", "not valid YAML at line 1"),
    ("params: {learning_rate: {type: uniform, low: 0.1, high: 0.2}}", "unknown parameter 'learning_rate'"),
    ("params: {lr: {type: gaussian, low: 0.1, high: 0.2}}", "'lr' has type 'gaussian'"),
    ("params: {lr: {type: uniform, low: 0.2, high: 0.1}}", "'lr' has low 0.2 > high 0.1"),
    ("params: {gamma: {type: uniform, low: 0.1, high: 0.5, when: {sched: step}}}", "unknown parameter 'sched'"),
    ("params: {lr: {type: loguniform, low: 1e-4, high: 1.0e-2}}", "must be numbers"),
    ("params: {lr: {type: categorical}}", "'lr' needs a non-empty 'choices'"),
    ("lr: 0.1", "needs a 'params' mapping"),
    ("params: {epochs: {type: int, low: 1, high: 9}}", "'epochs' must be a fixed value"),
    ("params: {lr: {type: uniform, low: 0.1, high: 0.2}}\npoints_to_evaluate: [{rank: 4}]", "sets rank"),
    ("params: {optimizer: {type: categorical, choices: [adam]}}\npoints_to_evaluate: [{optimizer: lion}]",
     "optimizer='lion' is not one of"),
    ("params:\n  lr: !!python/object/apply:os.system [echo]", "YAML tags such as .* are not allowed in search spaces"),
])
def test_broken_space_files_name_the_key(tmp_path, text, culprit):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(GalaxyTuneError, match=culprit):
        load_space(path)


def test_missing_space_file(tmp_path):
    with pytest.raises(GalaxyTuneError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, culprit", [
    ('lora_stages: "5"', "'lora_stages' is fixed to a value training refuses: lora_stages='5' must list"),
    ("lr_decay: 0", "'lr_decay' is fixed to a value training refuses: hyperparameter lr_decay=0.0 must be positive"),
    ("frozen_stages: 7", "'frozen_stages' is fixed to a value training refuses: frozen_stages=7 must be 0"),
    ("lora_batchnorm: maybe", "lora_batchnorm='maybe' is not one of frozen, stats, affine"),
    ("lora_scaling: x", "lora_scaling='x' is not one of standard, rslora"),
    ("label_smoothing: 1.5", "label_smoothing=1.5 must be in [0, 1)"),
    ("lora_targets: {type: categorical, choices: [bottleneck, everything, all]}",
     "'lora_targets' has a choice training refuses: lora_targets='everything' is not one of"),
    ("lr_decay: {type: uniform, low: -1, high: 0.5}",
     "'lr_decay' has a range training refuses (low -1.0): hyperparameter lr_decay=-1.0 must be positive"),
])
def test_values_training_refuses_are_refused_with_the_space_file(tmp_path, text, culprit):
    # The same rules as TrainConfig's: no trial could start with these, so the file is refused before Ray starts.
    path = tmp_path / "space.yaml"
    path.write_text(f"params:\n  lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-2}}\n  {text}\n")
    with pytest.raises(GalaxyTuneError, match=re.escape(culprit)):
        load_space(path, {"method": "lora"})
