"""Predict a folder of galaxy JPEGs with an exported model: GalaxyID + one column per output.

A classifier gives one probability column per class. A `kaggle-votes` model gives the 37 vote fractions in the
competition's column order, consistent with the decision tree: run on Kaggle's `images_test_rev1`, the CSV is a
submission file for the challenge's late-submission page.

The model is a Hugging Face folder written by `retrain` (`<method>-seed<S>/hf/`). Its `galaxy_tune.json`
carries what training used and the model cannot know: the image size and centre crop. Pixels go through the
very functions training used (`pixels.decode`, then `train.predict_logits`, which normalises as `loader.batches`
does), so a galaxy gets the same probabilities here as in the retrain's test.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .data.kaggle import IMAGE_SIZE_PX
from .data.pixels import NotGalaxyImage, decode
from .errors import GalaxyTuneError
from .models.export import load_exported
from .data.loader import ImageSplit
from .data.tasks import get_task
from .train import pick_device, place, predict_logits

IMAGES_PER_CHUNK = 2048  # decoded at a time, so a folder of 80,000 galaxies never sits in memory at once


def predict_folder(model_dir: Path, images_dir: Path, out_csv: Path | None = None, tta: bool = False,
                   image_size_px: int | None = None, crop_px: int | None = None,
                   batch_size: int = 64, device: str | None = None) -> pd.DataFrame:
    """The outputs (class probabilities, or kaggle-votes' 37 fractions) of every JPEG in `images_dir` (GalaxyID =
    file name stem), also written to `out_csv` when given (predictions.csv inside it when it is a folder). Bad
    images are listed together, and nothing is written.

    `tta` averages the logits over the 8 flips and 90° rotations of each image. The image size and crop come
    from the model's galaxy_tune.json; `image_size_px` / `crop_px` are needed only for a model without one.
    """
    for flag, value, low in (("--image-size", image_size_px, 8), ("--crop", crop_px, 8), ("batch_size", batch_size, 1)):
        if value is not None and value < low:
            raise GalaxyTuneError(f"{flag} {value} must be {low} or more")
    out_csv = None if out_csv is None else output_csv(out_csv)
    model, class_names, size, crop, task = load_exported(Path(model_dir), image_size_px, crop_px)
    task = get_task(task)
    paths = list_jpegs(Path(images_dir))
    device = pick_device(device)
    place(model, device)
    outputs, bad = [], {}
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool, \
            tqdm(total=len(paths), desc="classifying", unit="img", disable=len(paths) < 1000) as progress:
        for start in range(0, len(paths), IMAGES_PER_CHUNK):
            chunk = paths[start:start + IMAGES_PER_CHUNK]
            decoded = list(pool.map(lambda path: decode_or_explain(path, size, crop), chunk))
            bad.update((path, why) for path, why in zip(chunk, decoded) if isinstance(why, str))
            if not bad:  # once an image is bad, the rest is only decoded, to list every bad one
                split = ImageSplit(np.stack(decoded), np.arange(len(chunk)), np.zeros(len(chunk), dtype=np.int64),
                                   np.arange(len(chunk)))
                outputs.append(task.predictions(predict_logits(model, split, device, batch_size, tta=tta)))
            progress.update(len(chunk))
    if bad:
        listing = "; ".join(f"{path.name}: {why}" for path, why in list(bad.items())[:20])
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        raise GalaxyTuneError(f"{len(bad)} bad image(s) in {images_dir}: {listing}{more}; replace them with "
                              f"{IMAGE_SIZE_PX}x{IMAGE_SIZE_PX} RGB JPEGs or move them out of the folder")
    table = pd.DataFrame(np.concatenate(outputs), columns=class_names)
    table.insert(0, "GalaxyID", galaxy_ids(paths))
    if out_csv is not None:
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out_csv, index=False)
    return table


def output_csv(out: Path) -> Path:
    """Where predictions go: `out`, or predictions.csv inside it when it is a folder."""
    out = Path(out)
    return out / "predictions.csv" if out.is_dir() else out


def list_jpegs(images_dir: Path) -> list[Path]:
    """The JPEGs of a folder, numeric names in numeric order (GalaxyIDs), others after them by name."""
    if not images_dir.is_dir():
        raise GalaxyTuneError(f"image folder {images_dir} does not exist: pass --images with a folder of galaxy "
                              "JPEGs, e.g. Kaggle's images_test_rev1")
    paths = [p for p in images_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file()]
    if not paths:
        raise GalaxyTuneError(f"no .jpg files in {images_dir}: pass --images with a folder of galaxy JPEGs")
    return sorted(paths, key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.stem))


def galaxy_ids(paths: list[Path]) -> pd.Series:
    """File stems as GalaxyIDs: integers when every name is a number, as Kaggle's are."""
    stems = pd.Series([p.stem for p in paths])
    return stems.astype(np.int64) if stems.str.isdigit().all() else stems


def decode_or_explain(path: Path, image_size_px: int, crop_px: int | None) -> np.ndarray | str:
    """`pixels.decode`, or what is wrong with the file."""
    try:
        return decode(path, image_size_px, crop_px)
    except NotGalaxyImage as err:
        return str(err)
    except (OSError, SyntaxError, ValueError) as err:
        return f"unreadable ({err})"
