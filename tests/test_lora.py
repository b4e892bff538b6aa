import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import ResNetForImageClassification
from transformers.models.resnet.modeling_resnet import ResNetConvLayer

from conftest import randomise_batchnorm
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.models.lora import (
    LORA_TARGETS,
    FrozenBatchNormLoraLayer,
    LoraConv2d,
    adapter_state_dict,
    add_lora,
    load_adapter_state,
    load_adapters,
    save_adapters,
    set_lora_sum,
    to_plain_model,
)
from galaxy_tune.models.backbone import RANDOM_RESNET50, TINY, build_model, count_parameters

FIXTURES = Path(__file__).parent / "fixtures"

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
    return sum(isinstance(m, LoraConv2d) for m in model.modules())


@pytest.mark.parametrize("targets", LORA_TARGETS)
def test_adapters_leave_outputs_unchanged_before_training(targets):
    base = build_model(TINY)
    lora = add_lora(copy.deepcopy(base), rank=4, alpha=8, targets=targets)
    for train in (True, False):
        torch.testing.assert_close(_logits(lora, train), _logits(base, train), atol=1e-6, rtol=0)


@pytest.mark.parametrize("train_batchnorm", [False, True])
def test_only_adapters_and_head_are_trainable(train_batchnorm):
    model = add_lora(build_model(TINY), rank=4, alpha=8, batchnorm="affine" if train_batchnorm else "stats")
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


@pytest.mark.parametrize("rank, alpha, targets, culprit", [
    (0, 8, "bottleneck", "LoRA rank 0 is invalid"),
    (4, 0, "bottleneck", "LoRA alpha 0 is invalid"),
    (4, 8, "stem", "LoRA targets 'stem' is unknown"),
])
def test_invalid_lora_settings_are_rejected(rank, alpha, targets, culprit):
    with pytest.raises(GalaxyTuneError, match=culprit):
        add_lora(build_model(TINY), rank=rank, alpha=alpha, targets=targets)


@pytest.mark.parametrize("saved_in_eval_mode", [False, True])
@pytest.mark.parametrize("merge_weights", [True, False])
def test_saved_adapters_reproduce_the_trained_model(tmp_path, merge_weights, saved_in_eval_mode):
    settings = dict(rank=4, alpha=8, targets="bottleneck", batchnorm="affine", merge_weights=merge_weights)
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
    assert not any("base_layer" in key for key in snapshot)  # frozen weights are the base model's


def test_adapters_of_another_rank_are_rejected(tmp_path):
    save_adapters(add_lora(build_model(TINY), rank=4, alpha=8), tmp_path / "adapters.safetensors")
    with pytest.raises(GalaxyTuneError, match="rank"):
        load_adapters(add_lora(build_model(TINY), rank=8, alpha=8), tmp_path / "adapters.safetensors")


@pytest.mark.parametrize("batchnorm", ["stats", "frozen"])
@pytest.mark.parametrize("merged", [False, True])
def test_plain_model_matches_lora_model_and_loads_with_plain_transformers(tmp_path, merged, batchnorm):
    lora = add_lora(build_model(TINY), rank=4, alpha=8, targets="all", batchnorm=batchnorm)
    _train_a_few_steps(lora)
    lora.train(not merged)  # eval() convolves with the merged weight
    plain = to_plain_model(lora)
    assert _lora_conv_count(plain) == 0 and _lora_conv_count(lora) == 17
    assert not any(isinstance(m, FrozenBatchNormLoraLayer) for m in plain.modules())  # HF's own layers
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


def _small_adapter(conv: nn.Conv2d, relative_size: float) -> LoraConv2d:
    """A LoRA conv whose ΔW is `relative_size` of W in norm: the size of an early step at a low learning rate."""
    lora = LoraConv2d(conv, rank=8, alpha=8)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
        lora.lora_B.weight *= relative_size * conv.weight.norm() / lora.delta_weight().norm()
    return lora


def _small_effect(training: bool):
    """A conv, its LoRA layer with a small adapter, an input, and the adapter's effect on the layer's output in fp32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    lora = _small_adapter(conv, relative_size=3e-4).train()
    x = torch.randn(4, 64, 16, 16, requires_grad=training)
    with torch.no_grad():
        reference = lora(x) - conv(x)
    return conv, lora, x, reference


@pytest.mark.parametrize("training", [True, False], ids=["training-function", "no-grad-branch"])
def test_the_adapter_effect_survives_bf16_autocast_where_a_merged_weight_loses_it(training):
    conv, lora, x, reference = _small_effect(training)
    with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora(x)
        branch = (out - conv(x)).float().detach()
        merged = (nn.functional.conv2d(x, conv.weight + lora.delta_weight(), padding=1) - conv(x)).float().detach()
    error = lambda effect: ((effect - reference).norm() / reference.norm()).item()  # noqa: E731
    assert (out.grad_fn is not None) == training  # training: _LoraConvFunction's bf16 forward
    assert error(branch) < 0.01  # the branch: within 1 % of fp32
    assert error(merged) > 0.5  # bf16(W + ΔW) rounds most of ΔW away: what the branch avoids


@pytest.mark.parametrize("training", [True, False], ids=["training-function", "no-grad-branch"])
def test_a_lora_sum_cast_back_to_bf16_rounds_a_small_adapter_effect_away(training):
    conv, lora, x, reference = _small_effect(training)
    set_lora_sum(lora, "autocast")
    with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lora(x)
        effect = (out - conv(x)).float().detach()
    assert out.dtype == torch.bfloat16  # what BatchNorm after it sees, as after a plain convolution
    assert ((effect - reference).norm() / reference.norm()).item() > 0.5  # the fp32 sum keeps it within 1 %
    if training:
        out.float().sum().backward()
        assert lora.lora_A.weight.grad is not None and lora.lora_B.weight.grad.norm() > 0
    with pytest.raises(GalaxyTuneError, match="LoRA sum 'bf16' is unknown; use one of fp32, autocast"):
        set_lora_sum(lora, "bf16")


@pytest.mark.parametrize("kernel, stride, bias", [(1, 1, False), (3, 1, False), (3, 2, True), (7, 2, True)])
def test_the_training_function_has_the_exact_gradients_of_conv_plus_branch(kernel, stride, bias):
    """_LoraConvFunction (merged forward, its own backward) against autograd's numerical gradients in float64,
    including the base weight and bias when someone makes them trainable."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel, stride, kernel // 2, bias=bias).double()
    lora = LoraConv2d(conv, rank=2, alpha=3).double().train()
    nn.init.normal_(lora.lora_B.weight)
    conv.requires_grad_(True)
    x = torch.randn(2, 6, 9, 9, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *_: lora(x), (x, *conv.parameters(), *lora.lora_A.parameters(),
                                                           *lora.lora_B.parameters()))
    [grad] = torch.autograd.grad(lora(x).square().sum(), lora.lora_B.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # no second derivative, rather than a wrong one
        grad.sum().backward()


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                                  nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, groups=2)])
def test_convolutions_the_lora_layer_cannot_compute_are_refused(conv):
    with pytest.raises(GalaxyTuneError, match="LoRA adapts plain convolutions"):
        LoraConv2d(conv, rank=2, alpha=2)


def test_the_training_function_matches_autograd_through_the_two_conv_branch_in_float32():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    lora = LoraConv2d(conv, rank=4, alpha=8).train()
    nn.init.normal_(lora.lora_B.weight, std=0.05)
    x = torch.randn(3, 16, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(3, 32, 12, 12)
    weights = [x, lora.lora_A.weight, lora.lora_B.weight]
    by_function = torch.autograd.grad(lora(x), weights, grad)
    two_convs = conv(x) + lora.lora_B(lora.lora_A(x) * lora.scaling)  # what the layer computes, in plain autograd
    for ours, reference in zip(by_function, torch.autograd.grad(two_convs, weights, grad)):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_frozen_base_convs_get_no_weight_gradient():
    model = add_lora(build_model(TINY), rank=2, alpha=2)
    _train_a_few_steps(model)
    lora_convs = [m for m in model.modules() if isinstance(m, LoraConv2d)]
    assert all(m.base_layer.weight.grad is None and m.lora_A.weight.grad is not None for m in lora_convs)


def test_adapters_written_by_the_earlier_loralib_convlora_layer_still_load():
    # Written by galaxy_tune's loralib ConvLoRA layer (tiny model, seed 0, rank 2, alpha 4, trained BatchNorm),
    # with the logits that model gave on the saved pixels.
    model = add_lora(build_model(TINY, seed=0), rank=2, alpha=4, targets="bottleneck", batchnorm="affine")
    load_adapters(model, FIXTURES / "loralib_convlora_adapters.safetensors")
    expected = torch.load(FIXTURES / "loralib_convlora_logits.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(expected["pixels"]).logits, expected["logits"], atol=1e-5, rtol=1e-5)


def test_a_frozen_batchnorm_folded_into_the_lora_conv_trains_as_the_unfolded_layer(monkeypatch):
    torch.manual_seed(0)
    model = add_lora(build_model(TINY), rank=4, alpha=8, targets="all", batchnorm="frozen").train()
    randomise_batchnorm(model)
    for m in model.modules():
        if isinstance(m, LoraConv2d):
            nn.init.normal_(m.lora_B.weight, std=0.1)
    assert sum(isinstance(m, FrozenBatchNormLoraLayer) for m in model.modules()) == 13  # the stem + 12 in blocks
    trainable = [p for p in model.parameters() if p.requires_grad]

    def logits_and_gradients():
        logits = model(IMAGES).logits
        return logits.detach(), torch.autograd.grad(nn.functional.cross_entropy(logits, LABELS), trainable)

    folded = logits_and_gradients()
    monkeypatch.setattr(FrozenBatchNormLoraLayer, "forward", ResNetConvLayer.forward)  # conv, BatchNorm, ReLU
    unfolded = logits_and_gradients()
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-5)
    assert model.state_dict().keys() == add_lora(build_model(TINY), rank=4, alpha=8, targets="all").state_dict().keys()


def test_a_folded_frozen_batchnorm_under_bf16_autocast_stays_within_bf16_rounding_of_float32():
    torch.manual_seed(0)
    model = add_lora(build_model(TINY), rank=4, alpha=8, batchnorm="frozen").train()
    randomise_batchnorm(model)
    for m in model.modules():
        if isinstance(m, LoraConv2d):
            nn.init.normal_(m.lora_B.weight, std=0.1)
    with torch.no_grad():
        reference = model.eval()(IMAGES).logits  # float32, unfolded
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(IMAGES).logits.float()  # folded, bf16 convolutions
    assert logits.grad_fn is not None
    assert ((logits - reference).norm() / reference.norm()).item() < 0.03
