"""The fine-tuning design space: frozen stages, layer-wise lr decay, LoRA variants, BatchNorm modes, smoothing."""

import dataclasses
import math
import re

import pytest
import torch
from torch import nn

from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.models.lora import LoraConv2d
from galaxy_tune.train import TrainConfig, make_model, make_optimizer, train_step

IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1] * 4)
CPU = torch.device("cpu")
FULL = TrainConfig(method="full", lr=1e-2, weight_decay=0.1, optimizer="sgd", scheduler="constant")
LORA = dataclasses.replace(FULL, method="lora", lora_rank=2, lora_alpha=4)


BACKBONES = ["tiny", "timm:test_resnet", "timm:test_convnext"]
# Each backbone's stages by name, as HF's ResNet and timm's grouping place them: stem 5, stage s at 5 - s, head 0.
STAGE_NAMES = {"tiny": (r"resnet\.embedder\.", r"resnet\.encoder\.stages\.(\d)\.", 1),
               "timm:test_resnet": (r"encoder\.(conv1|bn1)\.", r"encoder\.layer(\d)\.", 0),
               "timm:test_convnext": (r"encoder\.stem\.", r"encoder\.stages\.(\d)\.", 1)}


def expected_depth(backbone: str, name: str) -> int:
    stem, stage, first = STAGE_NAMES[backbone]
    if re.match(stem, name):
        return 5
    found = re.match(stage, name)
    return 5 - (int(found.group(found.lastindex)) + first) if found else 0


def step(config: TrainConfig, backbone: str = "tiny"):
    """A tiny model after one optimisation step, with the parameters and buffers it had before."""
    model = make_model(config, backbone)
    for name, parameter in model.named_parameters():  # timm starts a ResNet block's last BatchNorm at 0 and a
        if name.endswith((".gamma", "bn2.weight", "bn3.weight")):  # ConvNeXt block's scale at 1e-6: the layers
            nn.init.ones_(parameter)  # before them would get no gradient to move by
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    train_step(model, make_optimizer(config, model), IMAGES, LABELS, CPU, config.label_smoothing)
    return model, before


def changed(model, before) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("frozen_stages", [0, 1, 3, 5])
def test_frozen_stages_get_no_gradient_and_do_not_move(frozen_stages, backbone):
    model, before = step(dataclasses.replace(FULL, frozen_stages=frozen_stages), backbone)
    for name, parameter in model.named_parameters():
        frozen = expected_depth(backbone, name) > 5 - frozen_stages
        assert (parameter.grad is None) == frozen, name
        assert torch.equal(parameter, before[name]) == frozen, name
    assert any(name.startswith("classifier.") for name in changed(model, before))  # the head always trains


@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_stage_gets_lr_times_decay_to_its_depth_and_norms_and_biases_no_weight_decay(backbone):
    config = dataclasses.replace(FULL, lr=1e-2, lr_decay=0.5)
    model = make_model(config, backbone)
    optimizer = make_optimizer(config, model)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        group = group_of[id(parameter)]
        assert group["lr"] == pytest.approx(1e-2 * 0.5 ** expected_depth(backbone, name)), name
        assert group["weight_decay"] == (0.1 if parameter.ndim >= 2 else 0.0), name
    assert optimizer.param_groups[0]["depth"] == 0  # the head's group first: the lr that fit reports


def test_rslora_scales_by_the_root_of_the_rank_and_lora_plus_speeds_up_b():
    standard = make_model(dataclasses.replace(LORA, lora_rank=4, lora_alpha=8), "tiny")
    rslora = make_model(dataclasses.replace(LORA, lora_rank=4, lora_alpha=8, lora_scaling="rslora"), "tiny")
    lora_conv = lambda model: next(m for m in model.modules() if isinstance(m, LoraConv2d))  # noqa: E731
    assert lora_conv(standard).scaling == 8 / 4 and lora_conv(rslora).scaling == 8 / math.sqrt(4)

    config = dataclasses.replace(LORA, lora_plus_ratio=16)
    model = make_model(config, "tiny")
    lr_of = {id(p): g["lr"] for g in make_optimizer(config, model).param_groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            assert lr_of[id(parameter)] == pytest.approx(config.lr)
        if ".lora_B." in name:
            assert lr_of[id(parameter)] == pytest.approx(16 * config.lr)


@pytest.mark.parametrize("mode, params_train, stats_move", [
    ("frozen", False, False), ("stats", False, True), ("affine", True, True)])
def test_each_batchnorm_mode_trains_exactly_what_it_names(mode, params_train, stats_move):
    model, before = step(dataclasses.replace(LORA, lora_batchnorm=mode))
    batchnorm = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    moved = changed(model, before)
    for prefix in batchnorm:
        assert ({f"{prefix}.weight", f"{prefix}.bias"} <= moved) == params_train, prefix
        assert ({f"{prefix}.running_mean", f"{prefix}.running_var"} <= moved) == stats_move, prefix
    assert not any("base_layer" in name for name in moved)  # the pretrained convolutions never move


def test_lora_stages_choose_where_adapters_go():
    model = make_model(dataclasses.replace(LORA, lora_stages="3,4"), "tiny")
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraConv2d)]
    assert adapted and all(n.startswith(("resnet.encoder.stages.2.", "resnet.encoder.stages.3.")) for n in adapted)


def test_label_smoothing_is_the_loss_that_trains():
    config = dataclasses.replace(FULL, label_smoothing=0.2, lr=1e-12)
    model = make_model(config, "tiny")
    model.train()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(pixel_values=IMAGES).logits, LABELS, label_smoothing=0.2)
    loss = train_step(model, make_optimizer(config, model), IMAGES, LABELS, CPU, config.label_smoothing)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_configs_from_before_the_new_dimensions_still_load():
    old = {"method": "lora", "lr": 1e-3, "lora_rank": 8, "lora_batchnorm": True}  # e.g. an old best.json
    config = TrainConfig.from_dict(old)
    assert config.lora_batchnorm == "affine" and config.lora_scaling == "standard" and config.lr_decay == 1.0
    assert TrainConfig.from_dict({**old, "lora_batchnorm": False}).lora_batchnorm == "stats"  # what False did


@pytest.mark.parametrize("values, culprit", [
    ({"frozen_stages": 6}, "frozen_stages=6 must be 0"),
    ({"lora_stages": "0,5"}, "lora_stages='0,5' must list the backbone's stages"),
    ({"lora_batchnorm": "half"}, "lora_batchnorm='half' is not one of"),
    ({"lora_plus_ratio": 0}, "lora_plus_ratio=0.0 must be positive"),
    ({"label_smoothing": 1}, r"label_smoothing=1.0 must be in \[0, 1\)"),
])
def test_bad_design_choices_are_refused(values, culprit):
    with pytest.raises(GalaxyTuneError, match=culprit):
        TrainConfig.from_dict(values)
