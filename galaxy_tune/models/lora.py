"""LoRA adapters on a backbone: add them, save and load them, and fold them back into a plain model.

The layers themselves (`LoraConv2d`, `LoraLinear`) are in `lora_layers`. The `lora_` names keep loralib's
`mark_only_lora_as_trainable` and `lora_state_dict` working. An HF ResNet adapts the convolutions of its bottleneck
blocks; a timm ResNet those of its blocks; a timm ConvNeXt the Linear layers of its blocks' MLPs (its depthwise
7×7 convolutions are grouped, which LoRA refuses).
"""

import copy
import numbers
import sys

import loralib
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.resnet.modeling_resnet import ResNetBottleNeckLayer, ResNetConvLayer

from ..errors import GalaxyTuneError
from .backbone import stage_of
from .choices import BATCHNORM_MODES, LORA_TARGETS, SCALINGS
from .lora_layers import (FoldedBatchNorm2d, FrozenBatchNormLoraLayer, LoraBranch, LoraConv2d,  # noqa: F401
                          LoraLinear, fold_frozen_batchnorm, require_plain_conv, unfold_frozen_batchnorm)
from .timm_backbone import TimmClassifier

# Under autocast, the dtype of a LoRA layer's output, base + effect: "fp32" (the sum's own, so BatchNorm, ReLU and the
# residual add after it run in fp32) or "autocast" (the fp32 sum cast back, as a plain convolution's output is).
LORA_SUMS = ("fp32", "autocast")
# Recorded with results: adapters of "loralib-convlora" (before this layer) hold rank r·k deltas, not rank r.
LORA_LAYER = "branch"


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: str = "bottleneck",
    batchnorm: str = "stats",
    merge_weights: bool = True,
    scaling: str = "standard",
    stages: tuple[int, ...] = (1, 2, 3, 4),
) -> nn.Module:
    """Wrap the `targets` layers of `stages` (1-4) in `LoraConv2d` or `LoraLinear` (in place); only LoRA and the
    head train. `targets`: bottleneck (the main path of every residual block: an HF ResNet's bottleneck convs, a
    timm ResNet's block convs, a ConvNeXt's MLP layers), conv3x3 (only those 3×3 convs) or all (every convolution
    and Linear layer but the head's).

    `batchnorm`: frozen (running statistics too: BatchNorm stays in eval mode), stats (running statistics update
    in training, the affine parameters stay) or affine (both train). `scaling`: standard (alpha / r) or rslora
    (alpha / √r). Outputs are unchanged until training, as lora_B starts at zero. With merge_weights, eval mode
    outside autocast convolves with the merged weight (plain-conv speed); the branch is used otherwise.
    """
    if not (isinstance(rank, numbers.Integral) and rank >= 1):
        raise GalaxyTuneError(f"LoRA rank {rank!r} is invalid; use an integer >= 1 (e.g. 4, 8, 16)")
    if not alpha > 0:
        raise GalaxyTuneError(f"LoRA alpha {alpha!r} is invalid; use a number > 0 (e.g. equal to the rank)")
    if targets not in LORA_TARGETS:
        raise GalaxyTuneError(f"LoRA targets {targets!r} is unknown; use one of {', '.join(LORA_TARGETS)}")
    if batchnorm not in BATCHNORM_MODES:
        raise GalaxyTuneError(f"LoRA batchnorm {batchnorm!r} is unknown; use one of {', '.join(BATCHNORM_MODES)}")
    if scaling not in SCALINGS:
        raise GalaxyTuneError(f"LoRA scaling {scaling!r} is unknown; use one of {', '.join(SCALINGS)}")
    if not stages or not set(stages) <= {1, 2, 3, 4}:
        raise GalaxyTuneError(f"LoRA stages {stages!r} are invalid; use the backbone's stages 1-4, e.g. (3, 4)")
    every_stage = set(stages) == {1, 2, 3, 4}  # the stem's conv ("all" targets) only with every stage
    found = _target_names(model, targets)
    stage = stage_of(model, found)
    names = [name for name in found if stage[name] in stages or (stage[name] is None and every_stage)]
    if not names:
        raise GalaxyTuneError(f"LoRA targets {targets!r} match no layer of this model's blocks; use 'bottleneck' "
                              "(every block's main path) or 'all'")
    for name in names:
        layer = model.get_submodule(name)
        kind = LoraLinear if isinstance(layer, nn.Linear) else LoraConv2d
        _replace_module(model, name, kind(layer, int(rank), alpha, merge_weights, rslora=scaling == "rslora"))
    loralib.mark_only_lora_as_trainable(model)
    model.classifier.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(batchnorm == "affine")
            if batchnorm == "frozen":  # normalise with the pretrained statistics, in training too
                module.register_forward_pre_hook(_keep_in_eval_mode)
    if batchnorm == "frozen":
        for name, module in list(model.named_modules()):
            if (isinstance(module, ResNetConvLayer) and isinstance(module.convolution, LoraConv2d)
                    and module.normalization.affine):
                _replace_module(model, name, FrozenBatchNormLoraLayer(module))
        for conv, bn in model.layer_batchnorm_pairs() if isinstance(model, TimmClassifier) else []:
            if type(conv) is LoraConv2d and type(bn) is nn.BatchNorm2d and bn.affine:  # not timm's BatchNormAct2d
                fold_frozen_batchnorm(conv, bn)
    return model


def _keep_in_eval_mode(module: nn.Module, _inputs) -> None:
    module.training = False


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what a LoRA result adds to its base model: lora_A/lora_B, the head, all BatchNorm params and buffers.

    BatchNorm running stats change in train mode (batchnorm "stats" and "affine"), so they are kept to reproduce
    the model exactly. The base conv weights never change, so they are never included.
    """
    state = loralib.lora_state_dict(model)
    batchnorm_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    for key, value in model.state_dict().items():
        if key.startswith(("classifier.", *batchnorm_prefixes)):
            state[key] = value
    # Copies, so a snapshot (e.g. of the best epoch) doesn't change as training goes on.
    return {key: value.detach().clone() for key, value in state.items()}


def is_legacy_adapter_state(state: dict[str, torch.Tensor]) -> bool:
    """Written by loralib's ConvLoRA layer (galaxy_tune before the branch layer): `<conv>.lora_A` with no `.weight`."""
    return any(key.endswith((".lora_A", ".lora_B")) for key in state)


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an `adapter_state_dict` into a model prepared by `add_lora` with the same rank and targets.

    Adapters of the earlier loralib ConvLoRA layer load too: their ΔW is folded into the frozen convolutions
    (the model computes what it computed then) and the branches start again from zero.
    """
    if is_legacy_adapter_state(state):
        state = _fold_legacy_adapters(model, state)
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
    model.load_state_dict(state, strict=False)


def _fold_legacy_adapters(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold ConvLoRA deltas ((out·k, r·k) @ (r·k, in·k), rank up to r·k) into the base convs; return the rest."""
    state = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, LoraConv2d):
            continue
        a, b = state.pop(f"{name}.lora_A", None), state.pop(f"{name}.lora_B", None)
        weight = module.base_layer.weight
        if a is None or b is None or a.shape[0] != b.shape[1] or b.shape[0] * a.shape[1] != weight.numel():
            raise GalaxyTuneError(f"old-format adapters do not fit {name} (rank {module.r}): build the model with "
                                  "the rank and targets they were trained with")
        with torch.no_grad():
            weight += (b @ a).view_as(weight).to(weight) * module.scaling
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach().clone()
        state[f"{name}.lora_B.weight"] = torch.zeros_like(module.lora_B.weight)
    print("warning: these adapters were written by the earlier loralib ConvLoRA layer: their deltas are folded "
          "into the frozen convolutions, so the model is the one trained; new adapters start from zero",
          file=sys.stderr)
    return state


def save_adapters(model: nn.Module, path) -> None:
    """Write `adapter_state_dict(model)` to a safetensors file."""
    save_file({key: value.contiguous() for key, value in adapter_state_dict(model).items()}, str(path),
              metadata={"galaxy_tune_lora_layer": LORA_LAYER})


def load_adapters(model: nn.Module, path) -> None:
    """Load a `save_adapters` file into a model prepared by `add_lora` with the same rank and targets."""
    try:
        load_adapter_state(model, load_file(str(path)))
    except GalaxyTuneError as err:
        raise GalaxyTuneError(f"adapter file {str(path)!r}: {err}") from err


def to_plain_model(model: nn.Module) -> nn.Module:
    """Return a copy with every LoRA layer folded into a plain nn.Conv2d or nn.Linear (W + ΔW, in the weights'
    precision). The result runs at plain-model speed, and exports as a plain transformers or timm model."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, FrozenBatchNormLoraLayer):
            module.__class__ = ResNetConvLayer  # the same modules, HF's own layer again (it adds no state)
        if isinstance(module, FoldedBatchNorm2d):
            unfold_frozen_batchnorm(module)
        if isinstance(module, LoraBranch):
            layer = module.base_layer
            with torch.no_grad():
                layer.weight += module.delta_weight()
            _replace_module(plain, name, layer)
    return plain.requires_grad_(True)


def _target_names(model: nn.Module, targets: str) -> list[str]:
    """The convolutions and Linear layers that `targets` names, each checked before any is wrapped."""
    if targets == "all":
        names = [name for name, m in model.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.startswith("classifier.")]
    else:
        layers = model.block_layers() if isinstance(model, TimmClassifier) else [
            f"{block_name}.layer.{name}" for block_name, block in model.named_modules()
            if isinstance(block, ResNetBottleNeckLayer)
            for name, m in block.layer.named_modules() if isinstance(m, nn.Conv2d)]
        names = [name for name in layers
                 if targets == "bottleneck" or getattr(model.get_submodule(name), "kernel_size", None) == (3, 3)]
    for name in names:
        if isinstance(model.get_submodule(name), nn.Conv2d):
            require_plain_conv(model.get_submodule(name), name)
    return names


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def set_lora_sum(model: nn.Module, sum_dtype: str) -> None:
    """Set where the model's LoRA layers add the adapter's effect under autocast (LORA_SUMS; "fp32" by default)."""
    if sum_dtype not in LORA_SUMS:
        raise GalaxyTuneError(f"LoRA sum {sum_dtype!r} is unknown; use one of {', '.join(LORA_SUMS)}")
    for module in model.modules():
        if isinstance(module, LoraBranch):
            module.cast_sum = sum_dtype == "autocast"


def set_lora_merging(model: nn.Module, merge: bool) -> None:
    """Put the model in eval mode, its LoRA layers computing with the merged weight (merge) or the branch."""
    for module in model.modules():
        if isinstance(module, LoraBranch):
            module.merge_weights = merge
    model.eval()
