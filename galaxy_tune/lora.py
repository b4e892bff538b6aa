"""LoRA adapters (loralib) in the ResNet convolutions: add, save, load, and fold back into a plain model."""

import copy
import numbers

import loralib
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ResNetForImageClassification
from transformers.models.resnet.modeling_resnet import ResNetBottleNeckLayer

from galaxy_tune.errors import GalaxyTuneError

# bottleneck: the 1x1, 3x3, 1x1 convs of every bottleneck block's main path (not shortcuts, not the stem);
# conv3x3: only the 3x3 convs of those blocks; all: every nn.Conv2d in the model.
LORA_TARGETS = ("bottleneck", "conv3x3", "all")


def add_lora(
    model: ResNetForImageClassification,
    rank: int,
    alpha: float,
    targets: str = "bottleneck",
    train_batchnorm: bool = False,
    merge_weights: bool = True,
) -> ResNetForImageClassification:
    """Wrap the `targets` convs in loralib.Conv2d (in place) and leave only LoRA, head (and BatchNorm) trainable.

    Outputs are unchanged until training: the pretrained conv weights are copied in and lora_B starts at zero.
    With merge_weights, eval() folds B@A into the conv weights (plain-conv speed) and train() takes it out again.
    """
    if not (isinstance(rank, numbers.Integral) and rank >= 1):
        raise GalaxyTuneError(f"LoRA rank {rank!r} is invalid; use an integer >= 1 (e.g. 4, 8, 16)")
    if not alpha > 0:
        raise GalaxyTuneError(f"LoRA alpha {alpha!r} is invalid; use a number > 0 (e.g. equal to the rank)")
    if targets not in LORA_TARGETS:
        raise GalaxyTuneError(f"LoRA targets {targets!r} is unknown; use one of {', '.join(LORA_TARGETS)}")
    names = _target_conv_names(model, targets)
    if not names:
        raise GalaxyTuneError(
            f"LoRA targets {targets!r} match no convolution in this model (no bottleneck blocks?); use 'all'"
        )
    for name in names:
        _replace_module(model, name, _lora_conv(model.get_submodule(name), int(rank), alpha, merge_weights))
    loralib.mark_only_lora_as_trainable(model)
    model.classifier.requires_grad_(True)
    if train_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what a LoRA result adds to its base model: lora_A/lora_B, the head, all BatchNorm params and buffers.

    BatchNorm running stats change in train mode even when frozen, so they are kept to reproduce the model
    exactly. Conv weights are never included (eval() merges adapters into them), so any mode is safe.
    """
    state = loralib.lora_state_dict(model)
    batchnorm_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    for key, value in model.state_dict().items():
        if key.startswith(("classifier.", *batchnorm_prefixes)):
            state[key] = value
    # Copies, so a snapshot (e.g. of the best epoch) doesn't change as training goes on.
    return {key: value.detach().clone() for key, value in state.items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an `adapter_state_dict` into a model prepared by `add_lora` with the same rank and targets."""
    expected = adapter_state_dict(model)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        raise GalaxyTuneError(
            f"adapters do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong_shape[:3]}); build the same base model and call add_lora with the rank "
            f"and targets they were trained with"
        )
    lora_convs = [m for m in model.modules() if isinstance(m, loralib.ConvLoRA)]
    modes = [m.training for m in lora_convs]
    # Unmerge first: a merged conv would later subtract the *new* B@A from weights holding the old one.
    for conv in lora_convs:
        conv.train(True)
    model.load_state_dict(state, strict=False)
    for conv, mode in zip(lora_convs, modes):
        conv.train(mode)


def save_adapters(model: nn.Module, path) -> None:
    """Write `adapter_state_dict(model)` to a safetensors file."""
    save_file({key: value.contiguous() for key, value in adapter_state_dict(model).items()}, str(path))


def load_adapters(model: nn.Module, path) -> None:
    """Load a `save_adapters` file into a model prepared by `add_lora` with the same rank and targets."""
    try:
        load_adapter_state(model, load_file(str(path)))
    except GalaxyTuneError as err:
        raise GalaxyTuneError(f"adapter file {str(path)!r}: {err}") from err


def to_plain_model(model: ResNetForImageClassification) -> ResNetForImageClassification:
    """Return a copy with every LoRA conv folded into a plain nn.Conv2d (W + B@A * scaling).

    The result runs at plain-model speed and can be `save_pretrained` and loaded with plain transformers.
    """
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, loralib.ConvLoRA):
            conv = module.conv
            if not module.merged:
                # Same reshaping as loralib's own merge in ConvLoRA.train(False).
                conv.weight.data += (module.lora_B @ module.lora_A).view(conv.weight.shape) * module.scaling
            _replace_module(plain, name, conv)
    return plain.requires_grad_(True)


def _target_conv_names(model: nn.Module, targets: str) -> list[str]:
    if targets == "all":
        return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = []
    for block_name, block in model.named_modules():
        if isinstance(block, ResNetBottleNeckLayer):
            for name, m in block.layer.named_modules():
                if isinstance(m, nn.Conv2d) and (targets == "bottleneck" or m.kernel_size == (3, 3)):
                    names.append(f"{block_name}.layer.{name}")
    return names


def _lora_conv(conv: nn.Conv2d, rank: int, alpha: float, merge_weights: bool) -> loralib.Conv2d:
    """A loralib.Conv2d equal to `conv`: loralib re-initialises the conv it wraps, so copy the weights back."""
    lora_conv = loralib.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size[0],  # loralib wants an int (ResNet kernels are square)
        r=rank,
        lora_alpha=alpha,
        merge_weights=merge_weights,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    lora_conv.conv.load_state_dict(conv.state_dict())
    lora_conv.train(conv.training)  # loralib's train() returns None, unlike nn.Module's
    return lora_conv


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)
