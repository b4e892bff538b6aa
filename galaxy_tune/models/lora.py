"""LoRA adapters in the ResNet convolutions: add, save, load, and fold back into a plain model.

Each adapted convolution becomes a `LoraConv2d`: the pretrained conv, frozen and untouched, plus a low-rank
branch, a k×k conv down to r channels (`lora_A`) and a 1×1 conv back up (`lora_B`, zero at init), scaled by
alpha / r. This is HF PEFT's structure for Conv2d, on loralib's `LoRALayer`; the `lora_` names keep loralib's
`mark_only_lora_as_trainable` and `lora_state_dict` working. Why a branch rather than loralib's `ConvLoRA`,
which merges W + B·A into one weight before convolving:
- the frozen conv needs no weight gradient, so LoRA trains faster than full fine-tuning;
- under bf16 autocast the merged weight rounds ΔW onto W's bf16 grid (most of a small ΔW is lost); the branch
  computes the adapter's effect on its own, and adds it to the base output in fp32.
Training runs the layer as one autograd function (`_LoraConvFunction`) whose backward forms no full-size tensor
beyond the input gradient, and folds a frozen BatchNorm after it into the convolution
(`FrozenBatchNormLoraLayer`); in eval mode outside autocast (e.g. CPU inference) the forward is one convolution
with the merged weight: plain-conv speed.
"""

import copy
import math
import numbers
import re
import sys

import loralib
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import ResNetForImageClassification
from transformers.models.resnet.modeling_resnet import ResNetBottleNeckLayer, ResNetConvLayer

from ..errors import GalaxyTuneError
from .choices import BATCHNORM_MODES, LORA_TARGETS, SCALINGS

# Under autocast, the dtype of a LoRA layer's output, base + effect: "fp32" (the sum's own, so BatchNorm, ReLU and the
# residual add after it run in fp32) or "autocast" (the fp32 sum cast back, as a plain convolution's output is).
LORA_SUMS = ("fp32", "autocast")
# Recorded with results: adapters of "loralib-convlora" (before this layer) hold rank r·k deltas, not rank r.
LORA_LAYER = "branch"


class LoraConv2d(nn.Module, loralib.LoRALayer):
    """A frozen convolution plus a trainable low-rank branch: base(x) + lora_B(lora_A(x)) · alpha / r."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, merge_weights: bool = True, rslora: bool = False):
        require_plain_conv(base, str(base))
        nn.Module.__init__(self)
        loralib.LoRALayer.__init__(self, r=rank, lora_alpha=alpha, lora_dropout=0.0, merge_weights=merge_weights)
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=base.weight.device,
                                dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as loralib and PEFT initialise A
        nn.init.zeros_(self.lora_B.weight)  # so the model is unchanged until training moves B
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank  # rsLoRA: rank-stabilised scaling
        self.cast_sum = False  # see LORA_SUMS and set_lora_sum

    def delta_weight(self) -> torch.Tensor:
        """ΔW of the branch as one conv weight: the 1×1 conv B after the k×k conv A is the conv with B·A."""
        return _delta(self.lora_A.weight, self.lora_B.weight, self.scaling).view_as(self.base_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        autocast = torch.is_autocast_enabled(x.device.type)
        if self.merge_weights and not self.training and not autocast:
            # Full precision eval: one convolution with W + ΔW (outside autocast, so ΔW is not rounded away).
            return F.conv2d(x, base.weight + self.delta_weight(), base.bias, **_geometry(base))
        weights = (x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in weights):
            return _LoraConvFunction.apply(*weights, self.scaling, _geometry(base), self.cast_sum)
        effect = self.lora_B(self.lora_A(x) * self.scaling)  # scaled at rank r, where it is cheap
        out = base(x)
        # The sum in fp32: under bf16 autocast a small effect added to the bf16 base output would round away.
        total = (out.float() if out.dtype != torch.float32 else out).add_(effect)
        return total.to(out.dtype) if self.cast_sum else total

    def folded(self, x: torch.Tensor, batchnorm: nn.BatchNorm2d) -> torch.Tensor:
        """batchnorm(self(x)) for a frozen BatchNorm in eval mode, in training: its scale folded into W and B, its
        shift into the bias, so the convolution's output is the normalised one and no BatchNorm pass or saved
        input exists (its statistics and affine parameters are constants)."""
        base = self.base_layer
        scale = batchnorm.weight / torch.sqrt(batchnorm.running_var + batchnorm.eps)
        shift = batchnorm.bias - batchnorm.running_mean * scale
        if base.bias is not None:
            shift = shift + base.bias * scale
        per_channel = scale.view(-1, 1, 1, 1)
        return _LoraConvFunction.apply(x, base.weight * per_channel, shift, self.lora_A.weight,
                                       self.lora_B.weight * per_channel, self.scaling, _geometry(base), self.cast_sum)


class FrozenBatchNormLoraLayer(ResNetConvLayer):
    """A ResNet conv layer (conv, BatchNorm, activation) with a LoRA conv and a frozen BatchNorm, which training
    folds into the convolution (`LoraConv2d.folded`); eval and no-grad passes run the layer as it is. The children
    keep their names, so checkpoints and adapters are those of the plain layer."""

    def __init__(self, layer: ResNetConvLayer):
        nn.Module.__init__(self)  # not ResNetConvLayer's: the layer's own modules move in
        self.convolution, self.normalization, self.activation = layer.convolution, layer.normalization, layer.activation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return self.activation(self.convolution.folded(hidden_states, self.normalization))
        return super().forward(hidden_states)


def _geometry(conv: nn.Conv2d) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)


class _LoraConvFunction(torch.autograd.Function):
    """A LoraConv2d in training: conv(x, W) + s·B(A(x)), with a backward that computes what autograd would through
    the two-conv branch (in fp32 to float rounding), minus two full-size passes per layer.

    Forward: on the CPU in full precision, one convolution with the merged W + s·B·A (equal to the branch up to
    float rounding), plus A(x), which B's gradient needs; under autocast, and on CUDA (whose convolutions may
    round fp32 inputs to TF32, which would round ΔW away as bf16 does), the branch, its effect added to the base
    output in fp32. Backward: the input gradient in one convolution through W + s·B·A (the branch's share
    included, not a second full-size gradient to add), B's and A's gradients from the rank-r tensors, and W's
    only if it is trainable (the frozen base never gets one).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a_weight, b_weight, scaling, geometry, cast_sum):
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        with torch.autocast(device_type, enabled=False):
            x = x.to(dtype)  # once for both convolutions (autocast would cast it twice)
            a = F.conv2d(x, a_weight.to(dtype), None, **geometry)
            if autocast or device_type != "cpu":
                out = F.conv2d(x, weight.to(dtype), None, **geometry).float()
                out.add_(F.conv2d(a, (b_weight * scaling).to(dtype)))
                if bias is not None:  # in fp32, as the BatchNorm shift it may be is added unfolded
                    out.add_(bias.float().view(-1, 1, 1))
                if cast_sum:
                    out = out.to(dtype)
            else:
                out = F.conv2d(x, _merged(weight, a_weight, b_weight, scaling), bias, **geometry)
        ctx.save_for_backward(x, a, weight, a_weight, b_weight)
        ctx.scaling, ctx.geometry = scaling, geometry
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # its backward has no graph: second derivatives raise
    def backward(ctx, grad):
        x, a, weight, a_weight, b_weight = ctx.saved_tensors
        need_x, need_weight, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        scaling, geometry = ctx.scaling, ctx.geometry
        grad_x = grad_weight = grad_a = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(x.dtype)
            if need_a or need_b:  # through the 1x1 conv s·B: the gradients of its input (rank r) and of B
                grad_rank, grad_b = _conv_backward(grad, a, b_weight * scaling, [need_a, need_b])
                if need_a:
                    grad_a = _conv_backward(grad_rank, x, a_weight, [False, True], **geometry)[1]
            if need_x or need_weight:
                grad_x, grad_weight = _conv_backward(grad, x, _merged(weight, a_weight, b_weight, scaling),
                                                     [need_x, need_weight], **geometry)
        return (grad_x, grad_weight, grad.sum((0, 2, 3)) if need_bias else None,
                None if grad_a is None else grad_a.to(a_weight.dtype),
                None if grad_b is None else (grad_b * scaling).to(b_weight.dtype), None, None, None)


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: list[bool],
                   stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> tuple:
    """(input gradient, weight gradient) of conv2d(x, weight), each only where `mask` asks for it."""
    return torch.ops.aten.convolution_backward(grad, x, weight.to(x.dtype), None, stride, padding, dilation, False,
                                               (0, 0), 1, [*mask, False])[:2]


def _merged(weight: torch.Tensor, a_weight: torch.Tensor, b_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s·B·A as one conv weight: the 1×1 conv B after the k×k conv A is the conv with B·A."""
    return weight + _delta(a_weight, b_weight, scaling).view_as(weight)


def _delta(a_weight: torch.Tensor, b_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    return (b_weight.flatten(1) @ a_weight.flatten(1)) * scaling


def add_lora(
    model: ResNetForImageClassification,
    rank: int,
    alpha: float,
    targets: str = "bottleneck",
    batchnorm: str = "stats",
    merge_weights: bool = True,
    scaling: str = "standard",
    stages: tuple[int, ...] = (1, 2, 3, 4),
) -> ResNetForImageClassification:
    """Wrap the `targets` convs of `stages` (1-4) in `LoraConv2d` (in place); only LoRA and the head train.

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
        raise GalaxyTuneError(f"LoRA stages {stages!r} are invalid; use ResNet stages 1-4, e.g. (3, 4)")
    every_stage = set(stages) == {1, 2, 3, 4}  # the stem's conv ("all" targets) only with every stage
    names = [name for name in _target_conv_names(model, targets)
             if _stage_of(name) in stages or (_stage_of(name) is None and every_stage)]
    if not names:
        raise GalaxyTuneError(
            f"LoRA targets {targets!r} match no convolution in this model (no bottleneck blocks?); use 'all'"
        )
    for name in names:
        _replace_module(model, name, LoraConv2d(model.get_submodule(name), int(rank), alpha, merge_weights,
                                                rslora=scaling == "rslora"))
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
    return model


def _keep_in_eval_mode(module: nn.Module, _inputs) -> None:
    module.training = False


def _stage_of(name: str) -> int | None:
    """The ResNet stage (1-4) a module name lies in; None outside the stages (the stem)."""
    match = re.match(r"resnet\.encoder\.stages\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else None


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


def to_plain_model(model: ResNetForImageClassification) -> ResNetForImageClassification:
    """Return a copy with every LoRA conv folded into a plain nn.Conv2d (W + ΔW, in the weights' precision).

    The result runs at plain-model speed and can be `save_pretrained` and loaded with plain transformers.
    """
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, FrozenBatchNormLoraLayer):
            module.__class__ = ResNetConvLayer  # the same modules, HF's own layer again (it adds no state)
        if isinstance(module, LoraConv2d):
            conv = module.base_layer
            with torch.no_grad():
                conv.weight += module.delta_weight()
            _replace_module(plain, name, conv)
    return plain.requires_grad_(True)


def _target_conv_names(model: nn.Module, targets: str) -> list[str]:
    if targets == "all":
        names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    else:
        names = []
        for block_name, block in model.named_modules():
            if isinstance(block, ResNetBottleNeckLayer):
                for name, m in block.layer.named_modules():
                    if isinstance(m, nn.Conv2d) and (targets == "bottleneck" or m.kernel_size == (3, 3)):
                        names.append(f"{block_name}.layer.{name}")
    for name in names:  # all checked before any is wrapped
        require_plain_conv(model.get_submodule(name), name)
    return names


def require_plain_conv(conv: nn.Conv2d, name: str) -> None:
    """Refuse what the LoRA layer's own convolutions and backward can't compute: groups, or padding other than
    zeros given as a number of pixels."""
    if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise GalaxyTuneError(f"LoRA adapts plain convolutions (no groups, zero padding given as numbers), not "
                              f"{name}: choose other targets")


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def set_lora_sum(model: nn.Module, sum_dtype: str) -> None:
    """Set where the model's LoRA layers add the adapter's effect under autocast (LORA_SUMS; "fp32" by default)."""
    if sum_dtype not in LORA_SUMS:
        raise GalaxyTuneError(f"LoRA sum {sum_dtype!r} is unknown; use one of {', '.join(LORA_SUMS)}")
    for module in model.modules():
        if isinstance(module, LoraConv2d):
            module.cast_sum = sum_dtype == "autocast"


def set_lora_merging(model: nn.Module, merge: bool) -> None:
    """Put the model in eval mode, its LoRA convs convolving with the merged weight (merge) or the branch."""
    for module in model.modules():
        if isinstance(module, LoraConv2d):
            module.merge_weights = merge
    model.eval()
