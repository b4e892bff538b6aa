"""The exported-model format: a folder that plain `transformers` (or `timm`) loads, plus what galaxy_tune needs.

`<method>-seed<S>/hf/` holds `config.json` and the weights, LoRA merged in. Its `galaxy_tune.json` holds what
`predict` needs and the model cannot know: image size, crop, class names, task, normalisation. An HF ResNet's
folder also holds the image processor that feeds the model the pixels it was trained on. A timm backbone's folder
is in timm's Hub layout: its config.json says the same, and `timm.create_model("local-dir:DIR", pretrained=True)`
loads it. A `kaggle-votes` model's 37 logits become vote fractions through
`galaxy_tune.data.tasks.per_question_softmax` (a plain softmax over all 37 would be wrong).
`<method>-seed<S>/adapters.safetensors` holds a LoRA result's adapters alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import ConvNextImageProcessor, ResNetForImageClassification

from ..data.kaggle import IMAGE_SIZE_PX
from ..data.loader import IMAGENET_MEAN, IMAGENET_STD
from ..data.tasks import DEFAULT_TASK
from ..errors import GalaxyTuneError
from ..layout import HF_FOLDER  # noqa: F401 (the name is here too)
from .backbone import normalisation
from .choices import is_timm
from .lora import save_adapters, to_plain_model
from .timm_backbone import TimmClassifier, load_timm, save_timm

if TYPE_CHECKING:
    from ..data.prepare import Prepared

MODEL_INFO = "galaxy_tune.json"  # beside config.json: {"image_size_px", "crop_px", "class_names", "task"}
ADAPTERS = "adapters.safetensors"
TRAIN_CONFIG = "train_config.json"


def save_exported(model, config: dict, method: str, prepared: Prepared, folder: Path,
                  temperature: float = 1.0) -> Path:
    """Write the trained model in Hugging Face format (LoRA merged in), plus a LoRA result's adapters alone.

    `config` is the training config as a dict (written beside the model); returns the hf/ folder. The
    temperature fitted on the val split is folded into the head (its weights and bias divided by it), so a plain
    `transformers` load gives the calibrated probabilities too; it is recorded in galaxy_tune.json.
    """
    hf = Path(folder) / HF_FOLDER
    hf.mkdir(parents=True, exist_ok=True)
    plain = to_plain_model(model) if method == "lora" else copy.deepcopy(model)
    with torch.no_grad():
        for parameter in plain.classifier.parameters():
            parameter /= temperature
    if isinstance(plain, TimmClassifier):
        save_timm(plain, hf, prepared.class_names, prepared.image_size_px,
                  (prepared.crop_px or IMAGE_SIZE_PX) / IMAGE_SIZE_PX)
    else:
        plain.config.id2label = dict(enumerate(prepared.class_names))
        plain.config.label2id = {name: i for i, name in enumerate(prepared.class_names)}
        plain.save_pretrained(hf)
        image_processor(prepared.image_size_px, prepared.crop_px).save_pretrained(hf)
    mean, std = normalisation(plain)
    (hf / MODEL_INFO).write_text(json.dumps({
        "image_size_px": prepared.image_size_px, "crop_px": prepared.crop_px,
        "class_names": list(prepared.class_names), "task": prepared.task, "temperature": temperature,
        "mean": list(mean), "std": list(std),
        **({"pretrained_input_px": plain.input_size_px()} if isinstance(plain, TimmClassifier) else {})}, indent=2))
    if method == "lora":
        save_adapters(model, Path(folder) / ADAPTERS)
    (Path(folder) / TRAIN_CONFIG).write_text(json.dumps(config, indent=2))
    return hf


def image_processor(image_size_px: int, crop_px: int | None) -> ConvNextImageProcessor:
    """The Hugging Face image processor that feeds an exported model the pixels it was trained on.

    ConvNext's processor (the one `microsoft/resnet-50` uses) resizes the short side to size / crop_pct, then
    centre-crops `size`: the same as our centre crop of `crop_px` followed by a bilinear resize.
    """
    return ConvNextImageProcessor(size={"shortest_edge": image_size_px},
                                  crop_pct=(crop_px or IMAGE_SIZE_PX) / IMAGE_SIZE_PX,
                                  resample=Image.Resampling.BILINEAR, image_mean=list(IMAGENET_MEAN),
                                  image_std=list(IMAGENET_STD))


def load_exported(model_dir: Path, image_size_px: int | None = None, crop_px: int | None = None
                  ) -> tuple[ResNetForImageClassification | TimmClassifier, list[str], int, int | None, str]:
    """(model, output names in order, image size, crop, task) of an exported model folder.

    `image_size_px` / `crop_px` are needed only for a model without galaxy_tune.json (a plain HF or timm model).
    """
    model_dir = Path(model_dir)
    if (model_dir / HF_FOLDER / "config.json").is_file():  # the <method>-seed<S> folder was given: use its model
        model_dir = model_dir / HF_FOLDER
    if not (model_dir / "config.json").is_file():
        why = "does not exist" if not model_dir.is_dir() else "holds no config.json"
        raise GalaxyTuneError(f"model folder {model_dir} {why}: pass the hf/ folder of a retrain, "
                              "e.g. --model results/retrain-<time>/full-seed0/hf")
    try:
        model = load_timm(model_dir) if is_timm(str(model_dir)) else \
            ResNetForImageClassification.from_pretrained(model_dir)
    except (OSError, ValueError, RuntimeError) as err:
        raise GalaxyTuneError(f"could not load the model in {model_dir} ({err}): pass the hf/ folder of a retrain "
                              "(or a transformers ResNet or timm classifier saved with its head)") from None
    info_path = model_dir / MODEL_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info:
        for flag, given, trained in (("--image-size", image_size_px, info["image_size_px"]),
                                     ("--crop", crop_px, info["crop_px"])):
            if given is not None and given != trained:
                raise GalaxyTuneError(f"{flag} {given} differs from the {trained} the model was trained with "
                                      f"({info_path}): leave {flag} out")
        image_size_px, crop_px = info["image_size_px"], info["crop_px"]
    elif image_size_px is None:
        raise GalaxyTuneError(f"{model_dir} has no {MODEL_INFO} saying which image size the model was trained "
                              "on: pass --image-size (and --crop) as used in training")
    labels = model.config.id2label
    class_names = [labels[i] for i in sorted(labels)]
    if class_names == [f"LABEL_{i}" for i in range(len(class_names))] and "class_names" in info:
        class_names = list(info["class_names"])
    return model, class_names, image_size_px, crop_px, info.get("task", DEFAULT_TASK)
