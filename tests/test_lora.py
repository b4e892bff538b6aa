import copy

import loralib
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import ResNetForImageClassification

from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.lora import (
    LORA_TARGETS,
    adapter_state_dict,
    add_lora,
    load_adapter_state,
    load_adapters,
    save_adapters,
    to_plain_model,
)
from galaxy_tune.model import RANDOM_RESNET50, TINY, build_model, count_parameters

IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1] * 4)


def _logits(model, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(IMAGES).logits


def _train_a_few_steps(model) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(IMAGES).logits, LABELS).backward()
        optimizer.step()


def _lora_conv_count(model) -> int:
    return sum(isinstance(m, loralib.Conv2d) for m in model.modules())


@pytest.mark.parametrize("targets", LORA_TARGETS)
def test_adapters_leave_outputs_unchanged_before_training(targets):
    base = build_model(TINY)
    lora = add_lora(copy.deepcopy(base), rank=4, alpha=8, targets=targets)
    for train in (True, False):
        torch.testing.assert_close(_logits(lora, train), _logits(base, train), atol=1e-6, rtol=0)


@pytest.mark.parametrize("train_batchnorm", [False, True])
def test_only_adapters_and_head_are_trainable(train_batchnorm):
    model = add_lora(build_model(TINY), rank=4, alpha=8, train_batchnorm=train_batchnorm)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    batchnorm = {
        f"{module_name}.{name}"
        for module_name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for name, _ in m.named_parameters()
    }
    lora = {name for name, _ in model.named_parameters() if "lora_" in name}
    expected = lora | {"classifier.1.weight", "classifier.1.bias"} | (batchnorm if train_batchnorm else set())
    assert trainable == expected
    assert count_parameters(model)[0] == sum(p.numel() for n, p in model.named_parameters() if n in expected)


@pytest.mark.parametrize("targets, expected_convs", [("bottleneck", 12), ("conv3x3", 4), ("all", 17)])
def test_targets_choose_which_convs_get_adapters(targets, expected_convs):
    # tiny: 4 bottleneck blocks of three convs (1x1, 3x3, 1x1), plus a stem conv and 4 shortcut convs.
    assert _lora_conv_count(add_lora(build_model(TINY), rank=2, alpha=2, targets=targets)) == expected_convs


@pytest.mark.parametrize("rank, alpha, targets", [(0, 8, "bottleneck"), (4, 0, "bottleneck"), (4, 8, "stem")])
def test_invalid_lora_settings_are_rejected(rank, alpha, targets):
    with pytest.raises(GalaxyTuneError, match="use"):
        add_lora(build_model(TINY), rank=rank, alpha=alpha, targets=targets)


@pytest.mark.parametrize("saved_in_eval_mode", [False, True])
@pytest.mark.parametrize("merge_weights", [True, False])
def test_saved_adapters_reproduce_the_trained_model(tmp_path, merge_weights, saved_in_eval_mode):
    settings = dict(rank=4, alpha=8, targets="bottleneck", train_batchnorm=True, merge_weights=merge_weights)
    trained = add_lora(build_model(TINY, seed=0), **settings)
    _train_a_few_steps(trained)
    trained.train(not saved_in_eval_mode)
    save_adapters(trained, tmp_path / "adapters.safetensors")

    restored = add_lora(build_model(TINY, seed=0), **settings)
    restored.train(not saved_in_eval_mode)
    load_adapters(restored, tmp_path / "adapters.safetensors")

    assert restored.training == (not saved_in_eval_mode)
    for train in (False, True):  # eval first: train-mode forwards update the BatchNorm running stats
        torch.testing.assert_close(_logits(restored, train), _logits(trained, train), atol=1e-5, rtol=1e-5)


def test_adapter_snapshot_does_not_follow_later_training():
    model = add_lora(build_model(TINY), rank=4, alpha=8)
    snapshot = adapter_state_dict(model)
    expected = _logits(model, False)
    _train_a_few_steps(model)
    load_adapter_state(model, snapshot)
    torch.testing.assert_close(_logits(model, False), expected, atol=1e-6, rtol=0)
    assert not any("convolution.conv.weight" in key for key in snapshot)


def test_adapters_of_another_rank_are_rejected(tmp_path):
    save_adapters(add_lora(build_model(TINY), rank=4, alpha=8), tmp_path / "adapters.safetensors")
    with pytest.raises(GalaxyTuneError, match="rank"):
        load_adapters(add_lora(build_model(TINY), rank=8, alpha=8), tmp_path / "adapters.safetensors")


@pytest.mark.parametrize("merged", [False, True])
def test_plain_model_matches_lora_model_and_loads_with_plain_transformers(tmp_path, merged):
    lora = add_lora(build_model(TINY), rank=4, alpha=8, targets="all")
    _train_a_few_steps(lora)
    lora.train(not merged)  # eval() merges the adapters into the conv weights
    plain = to_plain_model(lora)
    assert _lora_conv_count(plain) == 0 and _lora_conv_count(lora) == 17
    torch.testing.assert_close(_logits(plain, False), _logits(lora, False), atol=1e-5, rtol=1e-5)

    plain.save_pretrained(tmp_path)
    reloaded = ResNetForImageClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, False), _logits(lora, False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets, expected_convs", [("bottleneck", 48), ("conv3x3", 16)])
def test_adapter_file_is_small_next_to_full_resnet50(tmp_path, targets, expected_convs):
    model = add_lora(build_model(RANDOM_RESNET50), rank=8, alpha=8, targets=targets)
    assert _lora_conv_count(model) == expected_convs
    save_adapters(model, tmp_path / "adapters.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "full.safetensors"))
    adapter_bytes = (tmp_path / "adapters.safetensors").stat().st_size
    full_bytes = (tmp_path / "full.safetensors").stat().st_size
    print(f"{targets}: adapters {adapter_bytes / 1e6:.2f} MB, full {full_bytes / 1e6:.2f} MB, "
          f"ratio {adapter_bytes / full_bytes:.3f}")
    assert adapter_bytes < 0.15 * full_bytes
