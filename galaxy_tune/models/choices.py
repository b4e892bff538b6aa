"""The names a config or a command chooses among, without torch: backbones, ResNet stages and LoRA's options.

The search's driver checks and records configs with these alone; `backbone` and `lora` build what they name.
"""

DEFAULT_MODEL = "microsoft/resnet-50"
RANDOM_RESNET50 = "resnet50-random"
TINY = "tiny"
RANDOM_BACKBONES = (RANDOM_RESNET50, TINY)  # randomly initialised: nothing to download or check before training
STAGES = 4  # a ResNet's stages; depth counts from the head (0) down to the stem (STAGES + 1)

# bottleneck: the 1x1, 3x3, 1x1 convs of every bottleneck block's main path (not shortcuts, not the stem);
# conv3x3: only the 3x3 convs of those blocks; all: every nn.Conv2d in the model.
LORA_TARGETS = ("bottleneck", "conv3x3", "all")
BATCHNORM_MODES = ("frozen", "stats", "affine")
SCALINGS = ("standard", "rslora")


def describe_weights(name: str, seed: int) -> str:
    """Human-readable provenance of the backbone weights, recorded next to results."""
    if name == RANDOM_RESNET50:
        return f"random init resnet-50 (seed {seed})"
    if name == TINY:
        return f"random init tiny resnet (seed {seed})"
    return f"pretrained {name}"
