"""The names a config or a command chooses among, without torch: backbones, their stages and LoRA's options.

The search's driver checks and records configs with these alone; `backbone` and `lora` build what they name.
"""

import json
import os
from pathlib import Path

DEFAULT_MODEL = "microsoft/resnet-50"
RANDOM_RESNET50 = "resnet50-random"
TINY = "tiny"
RANDOM_BACKBONES = (RANDOM_RESNET50, TINY)  # randomly initialised: nothing to download or check before training
TIMM_PREFIX = "timm:"  # a timm architecture with random weights, e.g. timm:convnext_nano
HUB_PREFIX = "hf_hub:"  # a timm model on the Hugging Face Hub, as timm names it, e.g. hf_hub:mwalmsley/zoobot-...
STAGES = 4  # a ResNet's stages; depth counts from the head (0) down to the stem (STAGES + 1)

# bottleneck: the 1x1, 3x3, 1x1 convs of every bottleneck block's main path (not shortcuts, not the stem);
# conv3x3: only the 3x3 convs of those blocks; all: every nn.Conv2d in the model.
LORA_TARGETS = ("bottleneck", "conv3x3", "all")
BATCHNORM_MODES = ("frozen", "stats", "affine")
SCALINGS = ("standard", "rslora")


def is_timm(name: str) -> bool:
    """Whether a --model is a timm one: `timm:ARCH`, `hf_hub:REPO`, or a folder whose config.json names an
    `architecture` (timm's Hub layout; a transformers folder names `architectures`)."""
    if name.startswith((TIMM_PREFIX, HUB_PREFIX)):
        return True
    try:
        return "architecture" in json.loads((Path(os.path.expanduser(name)) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def describe_weights(name: str, seed: int) -> str:
    """Human-readable provenance of the backbone weights, recorded next to results."""
    if name == RANDOM_RESNET50:
        return f"random init resnet-50 (seed {seed})"
    if name == TINY:
        return f"random init tiny resnet (seed {seed})"
    if name.startswith(TIMM_PREFIX):
        return f"random init timm {name.removeprefix(TIMM_PREFIX)} (seed {seed})"
    return f"pretrained {name}"
