"""Galaxy Zoo data: validate the Kaggle layout, make a task's targets, split it once, cache decoded pixels.

`prepare` turns `<data-dir>` into a prepared folder: `splits.csv` (GalaxyID, label, split, and for `kaggle-votes`
the 37 target fractions; row i is row i of every pixel cache; `label` is the class of a binary task, and the
stratum, the Q1 answer, of `kaggle-votes`), `prepare.json` (task, outputs, counts per stratum, seed) and
`cache/<size>px-crop<c>-chw.npy`, a uint8
(N, 3, H, W) array decoded once and memory-mapped by every trial, so one copy in the page cache serves them all.
`galaxy_tune.data.loader` turns a split of that cache into normalised, augmented tensors on the training device.

Decoding runs on every core: a process pool whose workers write their rows straight into the memory-mapped
temporary cache and send back only the rows that failed. When the split is made, that one decoding pass is also the
check of every image (no separate scan): the bad ones are listed together, or dropped with --skip-bad.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import GalaxyTuneError
from .kaggle import CLASS_COLUMNS, CSV_NAME, IMAGE_SIZE_PX, IMAGES_DIR
from ..layout import new_folder, write_atomically
from .pixels import decode_rows, finish_cache, image_path, keep_rows, source_fingerprint, temporary_cache
from .tasks import DEFAULT_TASK, Task, get_task
SPLITS = ("train", "val", "test")
VOTE_TOLERANCE = 1e-4  # published fractions are rounded; allow tiny excursions outside [0, 1]


@dataclass(frozen=True)
class DataConfig:
    """Which data, which task, which split, which pixels."""

    data_dir: Path
    task: str = DEFAULT_TASK
    min_vote: float = 0.8
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    image_size_px: int = 224
    crop_px: int | None = None  # centre crop of the 424 px frame before resizing; None keeps the frame
    skip_bad: bool = False  # drop missing or unreadable images instead of failing (not part of the split's identity)
    workers: int | None = None  # decoding processes; None: one per core (neither is part of the split's identity)

    def __post_init__(self):
        get_task(self.task)
        if self.crop_px is not None and not 8 <= self.crop_px <= IMAGE_SIZE_PX:
            raise GalaxyTuneError(f"--crop {self.crop_px} must be between 8 and {IMAGE_SIZE_PX} px")
        if not 8 <= self.image_size_px <= 4096:
            raise GalaxyTuneError(f"--image-size {self.image_size_px} must be between 8 and 4096 px (224 for "
                                  "ResNet-50's pretraining size)")
        if not 0 <= self.min_vote <= 1:
            raise GalaxyTuneError(f"--min-vote {self.min_vote:g} must be a vote fraction between 0 and 1")
        if self.seed < 0:
            raise GalaxyTuneError(f"--seed {self.seed} must be 0 or more")
        if self.workers is not None and self.workers < 1:
            raise GalaxyTuneError(f"--workers {self.workers} must be 1 or more (default: one per core)")


@dataclass(frozen=True)
class Prepared:
    """A prepared folder: the split manifest, the task's outputs (class names, or the 37 columns) and the pixel
    cache of one image size."""

    folder: Path
    task: str
    class_names: tuple[str, ...]
    image_size_px: int
    crop_px: int | None

    @property
    def cache_path(self) -> Path:
        return self.folder / "cache" / cache_name(self.image_size_px, self.crop_px)

    def manifest(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / "splits.csv")


def prepared_folder(results_dir: Path, config: DataConfig) -> Path:
    """Where the manifest and pixel caches of one (data set, task, split seed) live, shared by all runs."""
    vote = f"-vote{config.min_vote:g}" if get_task(config.task).confident else ""
    tag = f"{Path(config.data_dir).resolve().name}-{config.task}{vote}-seed{config.seed}"
    return Path(results_dir).resolve() / "prepared" / tag


def cache_name(image_size_px: int, crop_px: int | None) -> str:
    return f"{image_size_px}px-crop{crop_px or IMAGE_SIZE_PX}-chw.npy"


# ---------------------------------------------------------------- labels


def read_votes(data_dir: Path) -> pd.DataFrame:
    """The Kaggle vote table indexed by GalaxyID, validated: 37 numeric columns in [0, 1], unique IDs."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise GalaxyTuneError(f"data folder {data_dir} does not exist: pass --data-dir with the Kaggle "
                              f"folder holding {CSV_NAME} and {IMAGES_DIR}/")
    csv = data_dir / CSV_NAME
    if not csv.is_file():
        raise GalaxyTuneError(f"{csv} is missing: the data folder must hold the Kaggle {CSV_NAME}")
    try:
        votes = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise GalaxyTuneError(f"{csv} is not a readable CSV ({err}): restore the Kaggle file") from None
    expected = ["GalaxyID", *CLASS_COLUMNS]
    missing = [c for c in expected if c not in votes.columns]
    extra = [c for c in votes.columns if c not in expected]
    if missing or extra:
        parts = ([f"missing columns {', '.join(missing)}"] if missing else []) + (
            [f"unexpected columns {', '.join(map(str, extra))}"] if extra else [])
        raise GalaxyTuneError(f"{csv}: {'; '.join(parts)}: the header must be GalaxyID,Class1.1,...,Class11.6")
    if votes.empty:
        raise GalaxyTuneError(f"{csv} has a header but no rows: restore the Kaggle file, one row per galaxy")
    for column in expected:
        if not pd.api.types.is_numeric_dtype(votes[column]):
            raise GalaxyTuneError(f"{csv}: column {column} has non-numeric values: fix or remove those rows")
    if votes[expected].isna().any().any():
        bad = votes.columns[votes.isna().any()].tolist()
        raise GalaxyTuneError(f"{csv}: empty values (NaN) in {', '.join(bad)}: fill or remove those rows")
    duplicated = votes["GalaxyID"][votes["GalaxyID"].duplicated()].unique()
    if len(duplicated):
        raise GalaxyTuneError(f"{csv}: duplicate GalaxyID {', '.join(map(str, duplicated[:5]))}: keep one row each")
    fractions = votes[CLASS_COLUMNS]
    outside = fractions.columns[((fractions < -VOTE_TOLERANCE) | (fractions > 1 + VOTE_TOLERANCE)).any()]
    if len(outside):
        raise GalaxyTuneError(f"{csv}: vote fractions outside [0, 1] in {', '.join(outside)}: "
                              "the columns must hold fractions of votes")
    return votes.astype({"GalaxyID": np.int64}).set_index("GalaxyID")


def task_labels(votes: pd.DataFrame, task: str, min_vote: float = 0.8) -> pd.Series:
    """The label (0/1) of each galaxy a binary task keeps, or its stratum (kaggle-votes: its Q1 answer), by GalaxyID."""
    return strata(get_task(task), get_task(task).targets(votes, min_vote))


def strata(task: Task, targets: pd.DataFrame) -> pd.Series:
    return pd.Series(task.strata(targets), index=targets.index, name="label")


def task_consensus(votes: pd.DataFrame, task: str) -> pd.Series:
    """How decisive the volunteers were, per GalaxyID: the vote fraction of the answer that decided the label."""
    return get_task(task).consensus(votes)


def read_consensus(data_dir: Path, task: str) -> pd.Series:
    """`task_consensus` of the vote table in `data_dir`."""
    return task_consensus(read_votes(data_dir), task)


def split_manifest(labels: pd.Series, seed: int, val_fraction: float, test_fraction: float,
                   every_class: bool = True, fix: str = "choose another --task") -> pd.DataFrame:
    """Seeded, stratified train/val/test split: a frame with GalaxyID, label, split in GalaxyID order.

    With `every_class` (binary tasks) both classes must be in every split. Without it (`labels` are strata, as
    for kaggle-votes), a stratum too small to be split joins the largest one for the split's sake. `fix` ends the
    message of a class left empty.
    """
    ids, y = labels.index.to_numpy(), labels.to_numpy()
    held = val_fraction + test_fraction
    if not (0 < val_fraction and 0 < test_fraction and held < 1):
        raise GalaxyTuneError(f"val/test fractions {val_fraction}/{test_fraction} must be > 0 and sum below 1")
    counts = np.bincount(y, minlength=2)
    if every_class and counts.min() == 0:
        raise GalaxyTuneError(f"the task leaves class {int(np.argmin(counts))} empty ({len(y)} galaxies kept): "
                              f"{fix}")
    if not every_class:  # each stratum needs 2 galaxies in the smaller held-out split
        y = np.where(counts[y] < max(10, math.ceil(2 / min(val_fraction, test_fraction))), int(np.argmax(counts)), y)
    from sklearn.model_selection import train_test_split  # here: trial workers never split, and it costs 0.7 s

    try:
        train_ids, rest_ids, _, rest_y = train_test_split(ids, y, test_size=held, stratify=y, random_state=seed)
        val_ids, test_ids = train_test_split(rest_ids, test_size=test_fraction / held, stratify=rest_y,
                                             random_state=seed)
        if every_class and min(np.bincount(rest_y[np.isin(rest_ids, part)], minlength=2).min()
                               for part in (val_ids, test_ids)) == 0:
            raise ValueError("a held-out split lacks a class")
    except ValueError:
        raise GalaxyTuneError(f"too few images for a stratified split: class counts {counts.tolist()}; "
                              "each class needs several images per split: add data or choose another task") from None
    split = pd.Series("train", index=ids)
    split[val_ids], split[test_ids] = "val", "test"
    return pd.DataFrame({"GalaxyID": ids, "label": labels.to_numpy(), "split": split.to_numpy()})


def cache_meta(prepared: Prepared, data_dir: Path, ids: np.ndarray) -> dict:
    """What a cache was made from: it is reused while this stays the same."""
    return {"fingerprint": source_fingerprint(data_dir, ids), "count": len(ids),
            "image_size_px": prepared.image_size_px, "crop_px": prepared.crop_px}


def cache_is_current(prepared: Prepared, meta: dict) -> bool:
    meta_path = prepared.cache_path.with_suffix(".json")
    return prepared.cache_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta


def build_cache(prepared: Prepared, data_dir: Path, workers: int | None = None) -> Path:
    """Decode every image of the manifest once into the uint8 cache; reuse it when it matches its source."""
    path = prepared.cache_path
    ids = prepared.manifest()["GalaxyID"].to_numpy()
    meta = cache_meta(prepared, data_dir, ids)
    if cache_is_current(prepared, meta):
        return path
    with temporary_cache(path, len(ids), prepared.image_size_px) as tmp:
        bad = decode_rows(tmp, data_dir, ids, prepared.image_size_px, prepared.crop_px, workers,
                          desc=f"caching {prepared.image_size_px}px pixels")
        if bad:
            raise GalaxyTuneError(f"{bad_listing(data_dir, bad, 'image(s) changed since the split was made')}; "
                                  f"restore them, or delete {prepared.folder} to re-split (searches made on the old "
                                  "split keep their results)")
        finish_cache(tmp, path, meta)
    return path


def bad_listing(data_dir: Path, bad: dict[int, str], what: str = "image(s)") -> str:
    """`3 bad image(s) in <dir>: a.jpg: missing; ...`, naming the first 20."""
    listing = "; ".join(f"{image_path(data_dir, i).name}: {why}" for i, why in list(bad.items())[:20])
    more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
    return f"{len(bad)} {what} in {data_dir / IMAGES_DIR}: {listing}{more}"


# ---------------------------------------------------------------- prepare


def prepare(config: DataConfig, out_dir: Path) -> Prepared:
    """Validate the data, write the split manifest and build the pixel cache (all reused when unchanged).

    A prepare that fails or is interrupted removes the folders it made while they are still empty.
    """
    out_dir = Path(out_dir).resolve()
    with ExitStack() as made:
        try:
            made.enter_context(new_folder(out_dir))
            probe = out_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise GalaxyTuneError(f"cannot write to {out_dir} ({err.strerror}): "
                                  "choose a writable --out/--results-dir") from None
        return prepare_in(config, out_dir)


def prepare_in(config: DataConfig, out_dir: Path) -> Prepared:
    """`prepare` in its output folder, made already."""
    data_dir = Path(config.data_dir).resolve()
    task = get_task(config.task)
    votes = read_votes(data_dir)
    for problem in task.vote_problems(votes):
        print(f"warning: {problem}", file=sys.stderr)
    targets = task.targets(votes, config.min_vote)
    # What decides the split. --skip-bad is not part of it: a split made with it stays valid without it.
    split_settings = {"data_dir": str(data_dir), "task": config.task,
                      "min_vote": config.min_vote if task.confident else None,
                      "seed": config.seed, "val_fraction": config.val_fraction,
                      "test_fraction": config.test_fraction}
    info_path = out_dir / "prepare.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    fingerprint = source_fingerprint(data_dir, np.array([], dtype=np.int64))  # the CSV alone
    prepared = Prepared(out_dir, config.task, task.outputs, config.image_size_px, config.crop_px)
    if info.get("settings") != split_settings or info.get("csv_fingerprint") != fingerprint:
        info = make_split(prepared, data_dir, task, targets, config, split_settings, fingerprint)
    else:
        build_cache(prepared, data_dir, config.workers)
    caches = sorted(set(info.get("caches", [])) | {prepared.cache_path.name})
    write_atomically(info_path, json.dumps({**info, "image_size_px": config.image_size_px,
                                            "crop_px": config.crop_px, "caches": caches}, indent=2))
    return prepared


def make_split(prepared: Prepared, data_dir: Path, task: Task, targets: pd.DataFrame, config: DataConfig,
               split_settings: dict, fingerprint: str) -> dict:
    """Split the task's galaxies and cache their pixels in one decoding pass, which is also the check of every image.

    Every galaxy the task keeps is decoded into the cache, row i for row i of the manifest; the bad images are then
    listed together (nothing is written), or with --skip-bad dropped from the split and their rows from the cache.
    Returns the prepare.json fields of the split.
    """
    labels = strata(task, targets)
    ids = labels.index.to_numpy()
    every_class = not task.regression  # a binary task needs both classes in every split: refused up front
    fix = "choose another --task or a lower --min-vote" if task.confident else \
        "check the CSV's vote fractions, or choose another --task"
    manifest = split_manifest(labels, config.seed, config.val_fraction, config.test_fraction, every_class, fix)
    meta = cache_meta(prepared, data_dir, ids)
    bad: dict[int, str] = {}
    with temporary_cache(prepared.cache_path, len(ids), config.image_size_px) as tmp:
        current = cache_is_current(prepared, meta)
        if not current:  # the split is remade, but the images it caches are the same
            bad = decode_rows(tmp, data_dir, ids, config.image_size_px, config.crop_px, config.workers,
                              desc=f"checking and caching {config.image_size_px}px pixels")
        if bad and not config.skip_bad:
            raise GalaxyTuneError(f"{bad_listing(data_dir, bad, 'bad image(s)')}; "
                                  "replace them or pass --skip-bad to drop them")
        if bad:
            print(f"skipping {len(bad)} bad image(s) (--skip-bad)")
            manifest = split_manifest(labels.drop(index=list(bad)), config.seed, config.val_fraction,
                                      config.test_fraction, every_class)
            keep_rows(tmp, np.flatnonzero(~np.isin(ids, list(bad))))
            meta = cache_meta(prepared, data_dir, manifest["GalaxyID"].to_numpy())
        # The targets ride along with each galaxy (kaggle-votes' 37 fractions; a label is there already).
        manifest = manifest.join(targets.drop(columns="label", errors="ignore"), on="GalaxyID")
        write_atomically(prepared.folder / "splits.csv", manifest.to_csv(index=False))
        if not current:
            finish_cache(tmp, prepared.cache_path, meta)
    counts = manifest.groupby(["split", "label"]).size().unstack(fill_value=0)
    return {"task": config.task, "class_names": list(task.outputs), "strata": list(task.strata_names),
            "seed": config.seed,
            "counts": {s: [int(counts.loc[s].get(c, 0)) for c in range(len(task.strata_names))] for s in SPLITS},
            "skipped_bad_images": len(bad), "settings": split_settings, "csv_fingerprint": fingerprint}


def load_prepared(folder: Path, image_size_px: int, crop_px: int | None) -> Prepared:
    """A prepared folder written earlier by `prepare` (the cache of that image size must exist)."""
    if not (Path(folder) / "prepare.json").is_file():
        raise GalaxyTuneError(f"the prepared data {folder} is gone: run `python -m galaxy_tune prepare` with the "
                              "settings of the search again (they are in its best.json under data)")
    info = json.loads((Path(folder) / "prepare.json").read_text())
    prepared = Prepared(Path(folder), info["settings"]["task"], tuple(info["class_names"]), image_size_px, crop_px)
    if not prepared.cache_path.is_file():
        raise GalaxyTuneError(f"no pixel cache {prepared.cache_path}: run `python -m galaxy_tune prepare` first")
    return prepared


def class_counts(prepared: Prepared) -> dict[str, list[int]]:
    """Images per class for each split."""
    return json.loads((prepared.folder / "prepare.json").read_text())["counts"]


def majority_share(counts: dict[str, list[int]], split: str) -> float:
    """Accuracy (0-1) on `split` of always answering the larger class of the training split."""
    return counts[split][int(np.argmax(counts["train"]))] / sum(counts[split])


def data_summary(prepared: Prepared) -> dict:
    """What a result records about its data."""
    info = json.loads((prepared.folder / "prepare.json").read_text())
    return {"prepared": str(prepared.folder), **info["settings"], "csv_fingerprint": info["csv_fingerprint"],
            "manifest_sha256": hashlib.sha256((prepared.folder / "splits.csv").read_bytes()).hexdigest()[:16],
            "class_names": list(prepared.class_names),
            "image_size_px": prepared.image_size_px, "crop_px": prepared.crop_px, "counts": info["counts"]}
