"""timm backbones (Zoobot's galaxy encoders, timm architectures) behind the HF ResNet's face.

A `TimmClassifier` is a timm encoder (`num_classes=0`: pooled features) plus a `classifier` head, as HF's
`ResNetForImageClassification` has: `model(pixel_values=x).logits`, `model.classifier[-1]` and
`model.config.num_labels` mean the same on both, so training, LoRA, calibration and export need no branch.
Its stages are timm's own: `group_matcher(coarse=True)` puts the stem in group 0 and stage s in group s.
The exported model is the encoder with the head put back: a folder in timm's Hub layout that
`timm.create_model("local-dir:DIR", pretrained=True)` loads alone.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import nn

from ..errors import GalaxyTuneError
from .choices import HUB_PREFIX, STAGES, TIMM_PREFIX


class Output(NamedTuple):
    logits: torch.Tensor


class TimmClassifier(nn.Module):
    """A timm encoder with a fresh linear head; the encoder's pretrained normalisation travels with it."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(encoder.num_features, num_labels))
        self.config = SimpleNamespace(num_labels=num_labels, id2label={i: f"LABEL_{i}" for i in range(num_labels)})

    def forward(self, pixel_values: torch.Tensor) -> Output:
        return Output(self.classifier(self.encoder(pixel_values)))

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the pixels the encoder was pretrained on."""
        cfg = self.encoder.pretrained_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"])

    def input_size_px(self) -> int:
        return int(self.encoder.pretrained_cfg["input_size"][-1])

    def block_layers(self) -> list[str]:
        """The main-path layers of every residual block: a ResNet block's convolutions (not its shortcut), a
        ConvNeXt block's MLP layers (not its grouped depthwise convolution)."""
        from timm.models.convnext import ConvNeXtBlock
        from timm.models.resnet import BasicBlock, Bottleneck

        names = []
        for block_name, block in self.encoder.named_modules():
            if isinstance(block, (BasicBlock, Bottleneck)):
                names += [f"{block_name}.{name}" for name, m in block.named_children() if isinstance(m, nn.Conv2d)]
            elif isinstance(block, ConvNeXtBlock):
                names += [f"{block_name}.mlp.{name}" for name, m in block.mlp.named_children()
                          if isinstance(m, (nn.Linear, nn.Conv2d))]
        return [f"encoder.{name}" for name in names]

    def layer_batchnorm_pairs(self) -> list[tuple[nn.Module, nn.BatchNorm2d]]:
        """(layer, BatchNorm) where the BatchNorm is applied right after the layer: a ResNet's convN and bnN (its
        stem's and its blocks'), and neighbours in a Sequential (a shortcut, a deep stem)."""
        from timm.models.resnet import BasicBlock, Bottleneck, ResNet

        pairs = []
        for parent in self.encoder.modules():
            if isinstance(parent, (BasicBlock, Bottleneck, ResNet)):
                pairs += [(getattr(parent, f"conv{n}"), getattr(parent, f"bn{n}")) for n in (1, 2, 3)
                          if hasattr(parent, f"conv{n}")]
            elif isinstance(parent, nn.Sequential):
                pairs += zip(parent, parent[1:])
        return [(layer, bn) for layer, bn in pairs if isinstance(bn, nn.BatchNorm2d)]

    def depths(self, names: list[str]) -> dict[str, int]:
        """How far below the head each parameter (or module with a weight) sits: stage s at 5 - s, the stem at 5,
        the head and what follows the last stage (e.g. ConvNeXt's head norm) at 0; by timm's own stage grouping."""
        group = _groups(self.encoder)

        def depth(name: str) -> int:
            inside = name.removeprefix("encoder.")
            if inside == name:
                return 0  # the head
            return max(STAGES + 1 - group.get(inside, group.get(f"{inside}.weight", STAGES + 1)), 0)

        return {name: depth(name) for name in names}


def _groups(encoder: nn.Module) -> dict[str, int]:
    """timm's coarse grouping of the encoder's parameters: the stem 0, stage s at s, what follows them last."""
    from timm.models import group_parameters

    return group_parameters(encoder, encoder.group_matcher(coarse=True), reverse=True)


def check_encoder(encoder: nn.Module, name: str) -> None:
    """Refuse an encoder that is not a stem and 4 stages in timm's grouping (ResNets and ConvNeXts are), or that
    takes its pretrained input size only (a MaxViT's attention windows are cut for it), not the search's."""
    groups = set(_groups(encoder).values())
    if not set(range(STAGES + 1)) <= groups <= set(range(STAGES + 2)):
        raise GalaxyTuneError(f"--model {name}: galaxy_tune trains backbones of a stem and {STAGES} stages (timm's "
                              f"ResNets and ConvNeXts), and timm groups this one in {len(groups)}: choose one of "
                              "those")
    if encoder.pretrained_cfg.get("fixed_input_size"):
        raise GalaxyTuneError(f"--model {name} takes {encoder.pretrained_cfg['input_size'][-1]} px images only, and "
                              "galaxy_tune feeds a backbone the search's --image-size: choose a timm ResNet or "
                              "ConvNeXt")


def build_encoder(name: str) -> nn.Module:
    """The timm encoder (`num_classes=0`) that `name` means: `timm:ARCH` (random weights), `hf_hub:REPO` or a
    local folder in timm's Hub layout (pretrained)."""
    import timm

    try:
        if name.startswith(TIMM_PREFIX):
            architecture = name.removeprefix(TIMM_PREFIX)
            if not timm.is_model(architecture):
                raise GalaxyTuneError(f"--model {name}: timm has no architecture {architecture!r}: see "
                                      "`python -c \"import timm; print(timm.list_models('convnext*'))\"`")
            encoder = timm.create_model(architecture, pretrained=False, num_classes=0)
        else:
            encoder = timm.create_model(f"local-dir:{hub_folder(name)}", pretrained=True, num_classes=0)
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise GalaxyTuneError(f"could not build the timm model {name!r} ({err}): pass `timm:ARCH`, `hf_hub:REPO` "
                              "or a folder in timm's Hub layout (config.json with architecture, plus weights)"
                              ) from None
    check_encoder(encoder, name)
    return encoder


def hub_folder(name: str) -> str:
    """The local folder of a timm model: `name` itself, or the Hugging Face cache's copy of `hf_hub:REPO`
    (downloaded when it is not cached and the Hub answers)."""
    if not name.startswith(HUB_PREFIX):
        return os.path.expanduser(name)
    import huggingface_hub

    from .backbone import cached_or_fetched

    repo = name.removeprefix(HUB_PREFIX)

    def snapshot(**kwargs) -> str:  # config.json and model.safetensors, else pytorch_model.bin (older timm repos)
        folder = huggingface_hub.snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"], **kwargs)
        if os.path.isfile(os.path.join(folder, "model.safetensors")):
            return folder
        return huggingface_hub.snapshot_download(repo, allow_patterns=["config.json", "pytorch_model.bin"], **kwargs)

    folder = repo.rsplit("/", 1)[-1]
    # huggingface_hub raises several kinds: not cached; a wrong id, a gated repo, a broken connection
    return cached_or_fetched(
        snapshot, Exception,
        offline=f"could not load {name} (offline and not in the Hugging Face cache): where there is network, run "
                f"`hf download {repo} --local-dir {folder}`, copy the folder here and name it in place of {name}",
        failed=lambda err: f"could not download {name} ({str(err).splitlines()[0]}): check the id, e.g. "
                           "hf_hub:mwalmsley/zoobot-encoder-resnet50")


def save_timm(model: TimmClassifier, folder: Path, class_names: list[str], image_size_px: int,
              crop_fraction: float) -> None:
    """Write the encoder with the head put back, in timm's Hub layout: config.json (architecture, class names, and
    the pixels it takes: size, centre crop, bilinear resize, mean and std) and model.safetensors."""
    from timm.models import save_for_hf

    encoder = _with_head(model)
    encoder.pretrained_cfg = {**encoder.pretrained_cfg, "input_size": [3, image_size_px, image_size_px],
                              "crop_pct": crop_fraction, "crop_mode": "center", "interpolation": "bilinear"}
    save_for_hf(encoder, str(folder), model_config={"label_names": list(class_names)}, safe_serialization=True)


def load_timm(folder: Path) -> TimmClassifier:
    """A `save_timm` folder as a TimmClassifier again (its head taken back out of the encoder)."""
    import timm

    encoder = timm.create_model(f"local-dir:{folder}", pretrained=True)
    head = encoder.get_classifier()
    if not isinstance(head, nn.Linear):
        raise OSError("it holds a timm encoder without a classifier head, not a trained model")
    model = TimmClassifier(encoder, head.out_features)
    model.classifier[-1].load_state_dict(head.state_dict())
    encoder.reset_classifier(0)
    names = encoder.pretrained_cfg.get("label_names")
    if names:
        model.config.id2label = dict(enumerate(names))
    return model


def _with_head(model: TimmClassifier) -> nn.Module:
    """A copy of the encoder whose own classifier is the model's head, as timm builds it with num_classes."""
    encoder = copy.deepcopy(model.encoder).to("cpu", memory_format=torch.contiguous_format)  # as safetensors saves
    linear = model.classifier[-1]
    with torch.random.fork_rng(devices=[]):  # the new head's random init is overwritten: leave the RNG alone
        encoder.reset_classifier(linear.out_features)
    encoder.get_classifier().load_state_dict(linear.state_dict())
    return encoder
