"""The backbone: one front door (`build_model`) for the HF ResNets (pretrained, random ResNet-50, tiny test
ResNets) and timm's (Zoobot's encoders, timm architectures), and where each parameter sits (`depths`)."""

import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

import huggingface_hub
import numpy as np
import torch
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from ..data.loader import IMAGENET_MEAN, IMAGENET_STD
from ..errors import GalaxyTuneError
from .choices import DEFAULT_MODEL, RANDOM_RESNET50, STAGES, TINY, describe_weights, is_timm  # noqa: F401 (here too)
from .timm_backbone import TimmClassifier, build_encoder

T = TypeVar("T")

_RANDOM_CONFIGS = {
    RANDOM_RESNET50: dict(layer_type="bottleneck", depths=[3, 4, 6, 3]),
    # Small enough that a forward+backward of a few 32 px images takes milliseconds on CPU.
    TINY: dict(layer_type="bottleneck", embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
}

_HUB_PROBE_TIMEOUT_SECONDS = 3.0

# Where a parameter sits in the HF ResNet, by name (as timm's group_matcher): the stem, stage 1-4, the head.
_STEM = re.compile(r"^resnet\.embedder\.")
_STAGE = re.compile(r"^resnet\.encoder\.stages\.(\d+)\.")


def build_model(name: str, num_labels: int = 2, seed: int = 0,
                head_bias: np.ndarray | None = None) -> ResNetForImageClassification | TimmClassifier:
    """Return a classifier with a fresh `num_labels` head: an HF ResNet (a Hub id or local folder, `resnet50-random`
    or `tiny`) or a timm one (`timm:ARCH`, `hf_hub:REPO`, or a folder in timm's Hub layout).

    Everything randomly initialised (random backbones, the new head) depends only on `seed`;
    the global RNG is left as it was. `head_bias` (the task's, e.g. kaggle-votes' prior) replaces the head's
    zero bias.
    """
    with torch.random.fork_rng(devices=[]):
        # Weights are initialised on CPU, so seeding the CPU generator alone is enough and leaves CUDA RNG alone.
        torch.default_generator.manual_seed(seed)
        if name in _RANDOM_CONFIGS:
            model = ResNetForImageClassification(ResNetConfig(num_labels=num_labels, **_RANDOM_CONFIGS[name]))
        elif is_timm(name):
            model = TimmClassifier(build_encoder(name), num_labels)
        else:
            model = _load_pretrained(name, num_labels)
    if head_bias is not None:
        with torch.no_grad():
            model.classifier[-1].bias.copy_(torch.as_tensor(head_bias, dtype=torch.float32))
    return model


def load_backbone(
    name: str | None, num_labels: int = 2, seed: int = 0
) -> tuple[ResNetForImageClassification, str]:
    """Return (model, name actually used); `None` means the default pretrained ResNet-50.

    Only the default falls back (with a one-line warning on stderr) to `resnet50-random` when its weights
    can't be had; an explicitly named model that fails to load raises GalaxyTuneError.
    """
    if name is not None:
        return build_model(name, num_labels, seed), name
    try:
        return build_model(DEFAULT_MODEL, num_labels, seed), DEFAULT_MODEL
    except GalaxyTuneError as err:
        print(
            f"warning: {err}; falling back to randomly initialised {RANDOM_RESNET50}.",
            file=sys.stderr,
        )
        return build_model(RANDOM_RESNET50, num_labels, seed), RANDOM_RESNET50


def depths(model: nn.Module, names: list[str]) -> dict[str, int]:
    """How far below the head each parameter or module name sits: 0 for the head, 1 for stage 4 ... 4 for stage 1,
    5 for the stem. A timm backbone's stages are timm's own grouping."""
    if isinstance(model, TimmClassifier):
        return model.depths(names)
    return {name: _hf_depth(name) for name in names}


def _hf_depth(name: str) -> int:
    if _STEM.match(name):
        return STAGES + 1
    stage = _STAGE.match(name)
    return STAGES - int(stage.group(1)) if stage else 0


def stage_of(model: nn.Module, names: list[str]) -> dict[str, int | None]:
    """The stage (1-4) each module name lies in; None outside the stages (the stem, the head)."""
    return {name: STAGES + 1 - depth if 1 <= depth <= STAGES else None for name, depth in depths(model, names).items()}


def normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the pixels the backbone was pretrained on: ImageNet's for the HF ResNets, a timm model's own."""
    return model.normalisation() if isinstance(model, TimmClassifier) else (IMAGENET_MEAN, IMAGENET_STD)


def freeze_stages(model: nn.Module, frozen_stages: int) -> nn.Module:
    """Freeze the stem and the first stages, `frozen_stages` of the 5 from the bottom (5: all but the head)."""
    named = dict(model.named_parameters())
    for name, depth in depths(model, list(named)).items():
        if depth > STAGES + 1 - frozen_stages:
            named[name].requires_grad_(False)
    return model


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_decay: float = 1.0,
                 lora_plus_ratio: float = 1.0) -> list[dict]:
    """Optimizer groups of the trainable parameters by name, the head's first: depth d gets lr · lr_decay^d
    (layer-wise decay, as timm and Zoobot), LoRA's B matrices lora_plus_ratio times that (LoRA+), and parameters
    of dim < 2 (biases, norms) no weight decay."""
    groups: dict[tuple, dict] = {}
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    for name, depth in depths(model, list(trainable)).items():
        parameter = trainable[name]
        lora_b = ".lora_B." in name
        decay = weight_decay if parameter.ndim >= 2 else 0.0
        group = groups.setdefault((depth, lora_b, decay), {
            "params": [], "lr": lr * lr_decay ** depth * (lora_plus_ratio if lora_b else 1.0),
            "weight_decay": decay, "depth": depth})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _load_pretrained(name: str, num_labels: int) -> ResNetForImageClassification:
    """Load from a local folder, the Hugging Face cache, or the Hub (in that order), replacing the head."""
    kwargs = dict(num_labels=num_labels, ignore_mismatched_sizes=True)
    folder = os.path.expanduser(name)
    if os.path.isdir(folder):
        try:
            return ResNetForImageClassification.from_pretrained(folder, **kwargs)
        except (OSError, ValueError) as err:
            raise GalaxyTuneError(
                f"could not load model folder {name!r} ({err}); pass a folder written by save_pretrained "
                f"of a transformers ResNet, or use {RANDOM_RESNET50}"
            ) from err
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise GalaxyTuneError(
            f"model folder {name!r} does not exist; check the path, pass a Hugging Face id such as "
            f"{DEFAULT_MODEL!r}, or use {RANDOM_RESNET50}"
        )
    return cached_or_fetched(
        lambda **cache: ResNetForImageClassification.from_pretrained(name, **cache, **kwargs), OSError,
        offline=f"could not load pretrained weights {name!r} (offline and not in the Hugging Face cache); run once "
                f"with network access to cache them, name a local folder with a copy (save_pretrained output) in its "
                f"place, or use {RANDOM_RESNET50}",
        failed=lambda err: f"could not load pretrained weights {name!r} ({err}); check the Hugging Face model id, "
                           f"name a local folder with a copy in its place, or use {RANDOM_RESNET50}")


def cached_or_fetched(fetch: Callable[..., T], missing: type[Exception] | tuple[type[Exception], ...], offline: str,
                      failed: Callable[[Exception], str]) -> T:
    """`fetch(local_files_only=True)` from the Hugging Face cache, else `fetch()` from the Hub. What `fetch` raises
    as `missing` means not cached, then not fetched (`failed` says why in one line); offline, `offline` says it."""
    try:
        return fetch(local_files_only=True)
    except missing:
        pass  # not cached yet: download below
    if not hub_reachable():
        raise GalaxyTuneError(offline)
    try:
        return fetch()
    except missing as err:
        raise GalaxyTuneError(failed(err)) from err


def hub_reachable() -> bool:
    """One quick request to the Hub; offline, from_pretrained would otherwise spend ~25 s in retries."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    try:
        huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=_HUB_PROBE_TIMEOUT_SECONDS)
    except Exception:  # any failure to reach the endpoint (DNS, refused, timeout, offline mode) means offline
        return False
    return True
