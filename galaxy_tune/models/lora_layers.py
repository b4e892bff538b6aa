"""The LoRA layers: a frozen layer plus a trainable low-rank branch, for convolutions and Linear layers.

Each adapted convolution becomes a `LoraConv2d`: the pretrained conv, frozen and untouched, plus a low-rank
branch, a k×k conv down to r channels (`lora_A`) and a 1×1 conv back up (`lora_B`, zero at init), scaled by
alpha / r. This is HF PEFT's structure for Conv2d, on loralib's `LoRALayer`; the `lora_` names keep loralib's
`mark_only_lora_as_trainable` and `lora_state_dict` working. Why a branch rather than loralib's `ConvLoRA`,
which merges W + B·A into one weight before convolving:
- the frozen conv needs no weight gradient, so LoRA trains faster than full fine-tuning;
- under bf16 autocast the merged weight rounds ΔW onto W's bf16 grid (most of a small ΔW is lost); the branch
  computes the adapter's effect on its own, and adds it to the base output in fp32.
Training runs the layer as one autograd function (`_LoraConvFunction`) whose backward forms no full-size tensor
beyond the input gradient, and folds a frozen BatchNorm after it into the convolution (`FrozenBatchNormLoraLayer`
in HF's ResNet, `fold_frozen_batchnorm` in timm's); in eval mode outside autocast (e.g. CPU inference) the forward
is one convolution with the merged weight: plain-conv speed.
"""
import math

import loralib
import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.resnet.modeling_resnet import ResNetConvLayer

from ..errors import GalaxyTuneError


class LoraBranch(nn.Module, loralib.LoRALayer):
    """A frozen layer plus a trainable low-rank branch beside it: base(x) + lora_B(lora_A(x)) · alpha / r."""

    def __init__(self, base: nn.Module, lora_a: nn.Module, lora_b: nn.Module, rank: int, alpha: float,
                 merge_weights: bool, rslora: bool):
        nn.Module.__init__(self)
        loralib.LoRALayer.__init__(self, r=rank, lora_alpha=alpha, lora_dropout=0.0, merge_weights=merge_weights)
        self.base_layer = base.requires_grad_(False)
        self.lora_A, self.lora_B = lora_a, lora_b
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as loralib and PEFT initialise A
        nn.init.zeros_(self.lora_B.weight)  # so the model is unchanged until training moves B
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank  # rsLoRA: rank-stabilised scaling
        self.cast_sum = False  # see LORA_SUMS and set_lora_sum

    def delta_weight(self) -> torch.Tensor:
        """ΔW of the branch in the base layer's weight shape: B·A scaled (for convolutions, the 1×1 conv B after the
        k×k conv A is the conv with B·A)."""
        return _delta(self.lora_A.weight, self.lora_B.weight, self.scaling).view_as(self.base_layer.weight)

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) plus the branch's effect, added in fp32: under bf16 autocast a small effect added to the bf16
        base output would round away."""
        effect = self.lora_B(self.lora_A(x) * self.scaling)  # scaled at rank r, where it is cheap
        out = self.base_layer(x)
        total = (out.float() if out.dtype != torch.float32 else out).add_(effect)
        return total.to(out.dtype) if self.cast_sum else total


class LoraConv2d(LoraBranch):
    """A frozen convolution with a LoRA branch: a k×k convolution down to rank r, then a 1×1 convolution back up."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, merge_weights: bool = True, rslora: bool = False):
        require_plain_conv(base, str(base))
        factory = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        super().__init__(base, nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                         base.dilation, **factory),
                         nn.Conv2d(rank, base.out_channels, 1, **factory), rank, alpha, merge_weights, rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        autocast = torch.is_autocast_enabled(x.device.type)
        if self.merge_weights and not self.training and not autocast:
            # Full precision eval: one convolution with W + ΔW (outside autocast, so ΔW is not rounded away).
            return F.conv2d(x, base.weight + self.delta_weight(), base.bias, **_geometry(base))
        weights = (x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in weights):
            return _LoraConvFunction.apply(*weights, self.scaling, _geometry(base), self.cast_sum)
        return self.branch_sum(x)

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


class FoldingLoraConv2d(LoraConv2d):
    """A LoraConv2d whose frozen BatchNorm is a sibling module, as in timm's blocks (conv1, bn1, ...): in training
    it folds that BatchNorm (`folded`), which then passes its input through (`FoldedBatchNorm2d`). Made by
    `fold_frozen_batchnorm`, which only changes the two modules' classes: their names and state stay."""

    def folds(self) -> bool:
        """Whether this pass folds the BatchNorm: a training pass with gradients (eval passes run both layers)."""
        return self.training and torch.is_grad_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folds():
            return self.folded(x, self.frozen_batchnorm)
        return super().forward(x)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A frozen BatchNorm that its convolution folds in training (see FoldingLoraConv2d); otherwise BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.folded_into.folds() else super().forward(x)  # folded: x is normalised already


def fold_frozen_batchnorm(conv: LoraConv2d, batchnorm: nn.BatchNorm2d) -> None:
    """Fold `batchnorm`, frozen and applied right after `conv` in its block's forward, into `conv` in training."""
    conv.__class__, batchnorm.__class__ = FoldingLoraConv2d, FoldedBatchNorm2d
    object.__setattr__(conv, "frozen_batchnorm", batchnorm)  # references, not children: the state stays as it was
    object.__setattr__(batchnorm, "folded_into", conv)


def unfold_frozen_batchnorm(batchnorm: FoldedBatchNorm2d) -> None:
    """Undo fold_frozen_batchnorm: BatchNorm applies itself again (its convolution is replaced by the caller)."""
    batchnorm.__class__ = nn.BatchNorm2d
    del batchnorm.__dict__["folded_into"]


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


def require_plain_conv(conv: nn.Conv2d, name: str) -> None:
    """Refuse what the LoRA layer's own convolutions and backward can't compute: groups, or padding other than
    zeros given as a number of pixels."""
    if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise GalaxyTuneError(f"LoRA adapts plain convolutions (no groups, zero padding given as numbers), not "
                              f"{name}: choose other targets")


class LoraLinear(LoraBranch):
    """A frozen Linear layer with a LoRA branch of two Linear layers. Autograd computes its backward: the frozen
    base's weight, which needs no gradient, gets none."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, merge_weights: bool = True, rslora: bool = False):
        factory = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        super().__init__(base, nn.Linear(base.in_features, rank, **factory), nn.Linear(rank, base.out_features,
                                                                                       **factory),
                         rank, alpha, merge_weights, rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merge_weights and not self.training and not torch.is_autocast_enabled(x.device.type):
            return F.linear(x, base.weight + self.delta_weight(), base.bias)
        return self.branch_sum(x)

