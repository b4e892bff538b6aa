"""Data: labels of both tasks, CSV validation, stratified reproducible splits, the pixel cache and batches."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import CROP_PX, FIXTURES, IMAGE_SIZE_PX, jpeg_claiming
from galaxy_tune.data.prepare import DataConfig, prepare, read_votes, split_manifest, task_labels
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.data.kaggle import CLASS_COLUMNS, CSV_NAME, IMAGES_DIR
from galaxy_tune.data.tasks import get_task
from galaxy_tune.data.loader import batches, open_split, orient


def real_rows(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    shutil.copy(FIXTURES / "galaxyzoo_real_rows.csv", folder / CSV_NAME)
    return folder


def test_seed_top2_labels_real_rows_with_ties(tmp_path):
    labels = task_labels(read_votes(real_rows(tmp_path)), "seed-top2")
    # Hand-computed: 100078 (Class1.1 wins) and 100123 (Class6.1 wins) are dropped; 100143 and 100445 tie
    # Class1.2 with a Class2.x/3.x answer and the first column wins, so they are Class1.2 (label 1).
    assert labels.to_dict() == {100008: 0, 100023: 0, 100053: 0, 100090: 0, 100134: 1, 100143: 1, 100445: 1,
                                135453: 0}


def test_smooth_featured_keeps_confident_votes(tmp_path):
    votes = read_votes(real_rows(tmp_path))
    assert task_labels(votes, "smooth-featured", min_vote=0.8).to_dict() == {100090: 0, 100134: 1}
    assert task_labels(votes, "smooth-featured", min_vote=0.7).to_dict() == {
        100053: 0, 100090: 0, 100134: 1, 100143: 1, 100445: 1}


@pytest.mark.parametrize("damage, culprit", [
    (lambda df: df.drop(columns=["Class3.1"]), "missing columns Class3.1"),
    (lambda df: df.assign(Extra=1.0), "unexpected columns Extra"),
    (lambda df: df.assign(**{"Class5.2": "lots"}), "column Class5.2 has non-numeric"),
    (lambda df: df.assign(**{"Class7.1": np.nan}), "NaN) in Class7.1"),
    (lambda df: pd.concat([df, df.iloc[[0]]]), "duplicate GalaxyID 100008"),
    (lambda df: df.assign(**{"Class9.2": 1.5}), "outside [0, 1] in Class9.2"),
])
def test_bad_csv_names_the_culprit(tmp_path, damage, culprit):
    folder = real_rows(tmp_path)
    damage(pd.read_csv(folder / CSV_NAME)).to_csv(folder / CSV_NAME, index=False)
    with pytest.raises(GalaxyTuneError, match=re.escape(culprit)):
        read_votes(folder)


@pytest.mark.parametrize("rows, culprit", [
    ("none", "has a header but no rows"),
    ("all zero", "leaves class 0 empty (0 galaxies kept): check the CSV's vote fractions, or choose another --task"),
])
def test_a_prepare_refused_for_its_csv_says_why_and_leaves_no_folder(tmp_path, rows, culprit):
    folder = real_rows(tmp_path)
    votes = pd.read_csv(folder / CSV_NAME)
    votes = votes.iloc[:0] if rows == "none" else votes.assign(**{column: 0.0 for column in CLASS_COLUMNS})
    votes.to_csv(folder / CSV_NAME, index=False)
    with pytest.raises(GalaxyTuneError, match=re.escape(culprit)) as err:
        prepare(DataConfig(folder), tmp_path / "results" / "prepared" / "real")
    assert "--min-vote" not in str(err.value)  # seed-top2 has no vote threshold to lower
    assert not (tmp_path / "results").exists()


def test_kaggle_votes_warns_once_about_rows_that_break_the_decision_tree(demo_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    votes = pd.read_csv(data / CSV_NAME)
    votes.loc[3, ["Class1.1", "Class1.2", "Class1.3"]] = 0.9
    votes.loc[7, CLASS_COLUMNS] = 0.0
    votes.to_csv(data / CSV_NAME, index=False)
    prepare(DataConfig(data, task="kaggle-votes", image_size_px=16), tmp_path / "out")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"2 of {len(votes)} rows break the decision tree" in err
    assert f"The worst is GalaxyID {votes['GalaxyID'][3]}: its Class1 answers sum to 2.7, not 1." in err
    assert get_task("kaggle-votes").vote_problems(read_votes(real_rows(tmp_path))) == []  # real rows obey it


def test_missing_csv_and_folder(tmp_path):
    with pytest.raises(GalaxyTuneError, match="does not exist"):
        read_votes(tmp_path / "nowhere")
    with pytest.raises(GalaxyTuneError, match=f"{CSV_NAME} is missing"):
        read_votes(tmp_path)


def test_split_is_stratified_and_reproducible():
    labels = pd.Series(np.r_[np.zeros(700, int), np.ones(300, int)], index=np.arange(1000) + 100000)
    a = split_manifest(labels, seed=3, val_fraction=0.1, test_fraction=0.1)
    assert a["split"].value_counts().to_dict() == {"train": 800, "val": 100, "test": 100}
    for _, part in a.groupby("split"):
        assert part["label"].mean() == pytest.approx(0.3, abs=0.01)
    assert a.equals(split_manifest(labels, seed=3, val_fraction=0.1, test_fraction=0.1))
    assert not a.equals(split_manifest(labels, seed=4, val_fraction=0.1, test_fraction=0.1))


def test_too_few_images_or_an_empty_class_is_refused():
    with pytest.raises(GalaxyTuneError, match="empty"):
        split_manifest(pd.Series([0] * 50), seed=0, val_fraction=0.1, test_fraction=0.1)
    with pytest.raises(GalaxyTuneError, match="too few images"):
        split_manifest(pd.Series([0] * 20 + [1] * 2), seed=0, val_fraction=0.1, test_fraction=0.1)


def test_prepare_writes_manifest_and_cache(prepared, demo_dir):
    manifest = prepared.manifest()
    assert list(manifest.columns) == ["GalaxyID", "label", "split"]
    assert set(manifest["split"]) == {"train", "val", "test"}
    pixels = np.load(prepared.cache_path, mmap_mode="r")
    assert pixels.shape == (len(manifest), 3, IMAGE_SIZE_PX, IMAGE_SIZE_PX) and pixels.dtype == np.uint8
    # Row i of the cache is the image of row i of the manifest.
    galaxy_id = manifest["GalaxyID"].iloc[5]
    with Image.open(demo_dir / IMAGES_DIR / f"{galaxy_id}.jpg") as image:
        lo, hi = (424 - CROP_PX) // 2, (424 + CROP_PX) // 2
        expected = np.asarray(image.convert("RGB").crop((lo, lo, hi, hi)).resize((IMAGE_SIZE_PX,) * 2), float)
    assert np.abs(pixels[5].transpose(1, 2, 0) - expected).mean() < 6  # same picture, up to resampling


def test_cache_is_reused_and_rebuilt_when_an_image_changes(demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    config = DataConfig(data, image_size_px=16)
    first = prepare(config, tmp_path / "out")
    stamp = first.cache_path.stat().st_mtime_ns
    assert prepare(config, tmp_path / "out").cache_path.stat().st_mtime_ns == stamp  # reused
    changed = data / IMAGES_DIR / f"{first.manifest()['GalaxyID'].iloc[0]}.jpg"
    Image.new("RGB", (424, 424), (255, 255, 255)).save(changed)
    again = prepare(config, tmp_path / "out")
    assert again.cache_path.stat().st_mtime_ns != stamp
    assert np.load(again.cache_path, mmap_mode="r")[0].min() > 240  # the new white image is in the cache


def test_bad_images_are_listed_and_can_be_skipped(demo_dir, tmp_path, capsys, recwarn):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    ids = pd.read_csv(data / CSV_NAME)["GalaxyID"]
    kept = task_labels(read_votes(data), "seed-top2").index
    missing, truncated, small, bomb, warned = [data / IMAGES_DIR / f"{i}.jpg" for i in kept[:5]]
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:2000])
    Image.new("RGB", (100, 100)).save(small)
    bomb.write_bytes(jpeg_claiming(20000))  # PIL's Image.open raises on it
    warned.write_bytes(jpeg_claiming(12000))  # PIL's Image.open warns about it
    config = DataConfig(data, image_size_px=16)
    with pytest.raises(GalaxyTuneError) as err:
        prepare(config, tmp_path / "out")
    message = str(err.value)
    assert "5 bad image(s)" in message and "--skip-bad" in message
    for path in (missing, truncated, small):
        assert path.name in message
    for path, side in ((bomb, 20000), (warned, 12000)):
        assert f"{path.name}: not a 424x424 RGB JPEG (JPEG RGB {side}x{side})" in message
    prepared = prepare(dataclasses.replace(config, skip_bad=True), tmp_path / "out")
    assert len(prepared.manifest()) == len(kept) - 5 and len(ids) > len(kept)
    printed = capsys.readouterr()
    assert "skipping 5 bad image(s)" in printed.out
    shown = printed.out + printed.err + "".join(str(w.message) for w in recwarn)
    assert "decompression" not in shown  # PIL's warning neither printed nor raised
    # The split made with --skip-bad stays valid for later runs without the flag (search, retrain).
    assert prepare(config, tmp_path / "out").manifest().equals(prepared.manifest())


def test_workers_decode_the_same_cache_bytes_and_manifest_as_one(demo_dir, tmp_path):
    one = prepare(DataConfig(demo_dir, image_size_px=16, workers=1), tmp_path / "one")
    two = prepare(DataConfig(demo_dir, image_size_px=16, workers=2), tmp_path / "two")
    assert one.cache_path.read_bytes() == two.cache_path.read_bytes()
    assert (one.folder / "splits.csv").read_bytes() == (two.folder / "splits.csv").read_bytes()
    # A cache of another size for the split made above: decoded by build_cache, still the same bytes.
    sizes = [prepare(DataConfig(demo_dir, image_size_px=24, crop_px=200, workers=w), tmp_path / f"w{w}")
             for w in (1, 2)]
    assert sizes[0].cache_path.read_bytes() == sizes[1].cache_path.read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary cache outlives a prepare
    info = json.loads((two.folder / "prepare.json").read_text())
    assert "workers" not in info["settings"]  # not part of the split: workers=1 reuses what workers=2 made
    stamp = two.cache_path.stat().st_mtime_ns
    assert prepare(DataConfig(demo_dir, image_size_px=16, workers=1), tmp_path / "two").cache_path.stat(
        ).st_mtime_ns == stamp


def test_bad_images_are_all_listed_and_skipped_with_two_workers(demo_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    kept = task_labels(read_votes(data), "seed-top2").index
    # Spread over the decoding chunks, first and last rows included.
    culprits = [data / IMAGES_DIR / f"{kept[i]}.jpg" for i in (0, 40, 41, len(kept) - 1)]
    culprits[0].unlink()
    culprits[1].write_bytes(culprits[1].read_bytes()[:2000])
    Image.new("RGB", (100, 100)).save(culprits[2])
    culprits[3].write_bytes(b"not a JPEG")
    config = DataConfig(data, image_size_px=16, workers=2)
    with pytest.raises(GalaxyTuneError) as err:
        prepare(config, tmp_path / "out")
    message = str(err.value)
    assert "4 bad image(s)" in message and "--skip-bad" in message
    for path, why in zip(culprits, ("missing", "unreadable", "not a 424x424 RGB JPEG", "unreadable")):
        assert f"{path.name}: {why}" in message
    assert not (tmp_path / "out" / "splits.csv").exists()  # nothing written
    assert not list((tmp_path / "out").rglob("*.npy*"))

    skipped = prepare(dataclasses.replace(config, skip_bad=True), tmp_path / "out")
    assert "skipping 4 bad image(s)" in capsys.readouterr().out
    manifest = skipped.manifest()
    assert len(manifest) == len(kept) - 4 and not set(manifest["GalaxyID"]) & {int(p.stem) for p in culprits}
    # The rows of the dropped images are gone from the cache: row i is still the image of manifest row i.
    pixels = np.load(skipped.cache_path)
    assert pixels.shape == (len(manifest), 3, 16, 16)
    reference = prepare(DataConfig(demo_dir, image_size_px=16, workers=1), tmp_path / "whole")
    whole = np.load(reference.cache_path)
    rows = reference.manifest().reset_index().set_index("GalaxyID").loc[manifest["GalaxyID"], "index"]
    assert np.array_equal(pixels, whole[rows.to_numpy()])
    # One process gives the same split and cache.
    alone = prepare(dataclasses.replace(config, skip_bad=True, workers=1), tmp_path / "alone")
    assert alone.manifest().equals(manifest)
    assert alone.cache_path.read_bytes() == skipped.cache_path.read_bytes()


def test_an_image_broken_after_the_split_is_named_with_every_other(demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    first = prepare(DataConfig(data, image_size_px=16), tmp_path / "out")
    broken = [data / IMAGES_DIR / f"{i}.jpg" for i in first.manifest()["GalaxyID"].iloc[[3, 70]]]
    for path in broken:
        path.write_bytes(b"broken")
    with pytest.raises(GalaxyTuneError, match="2 image.s. changed since the split") as err:
        prepare(DataConfig(data, image_size_px=24, workers=2), tmp_path / "out")
    assert all(path.name in str(err.value) for path in broken)
    assert not list((tmp_path / "out" / "cache").glob("24px*")) and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("workers", [0, -2])
def test_workers_below_one_are_refused(demo_dir, workers):
    with pytest.raises(GalaxyTuneError, match=f"--workers {workers} must be 1 or more"):
        DataConfig(demo_dir, workers=workers)


def test_bench_prepare_compares_one_worker_with_two_in_turns(demo_dir, tmp_path, capsys):
    from galaxy_tune.bench.preparing import bench_prepare

    figures = bench_prepare(demo_dir, tmp_path, image_size_px=16, rounds=2, workers=2)
    assert [len(rounds) for rounds in figures["rounds"].values()] == [2, 2]
    assert figures["settings"]["images"] == len(task_labels(read_votes(demo_dir), "seed-top2"))
    assert figures["one_worker_images_per_s"] > 0 and figures["all_workers_images_per_s"] > 0
    assert len(figures["speedup_per_round"]) == 2
    assert figures["speedup_range"][0] <= figures["speedup"] <= figures["speedup_range"][1]
    out = capsys.readouterr().out
    assert "1 worker" in out and "2 workers" in out and "speed-up" in out
    assert not list((tmp_path / "bench").iterdir())  # every round's folder is removed


def test_batches_normalise_shuffle_reproducibly_and_augment_with_the_dihedral_group(prepared):
    split = open_split(prepared, "train")
    plain = torch.cat([x for x, _ in batches(split, 16, torch.device("cpu"))])
    assert plain.shape == (len(split), 3, IMAGE_SIZE_PX, IMAGE_SIZE_PX)
    raw = torch.from_numpy(np.array(split.pixels[split.rows[0]])).float()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(plain[0], (raw / 255 - mean) / std, atol=1e-5)
    once = [y for _, y in batches(split, 16, torch.device("cpu"), shuffle=True, seed=7)]
    twice = [y for _, y in batches(split, 16, torch.device("cpu"), shuffle=True, seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(once, twice))
    assert sorted(torch.cat(once).tolist()) == sorted(split.labels.tolist())
    # Each of the 8 dihedral elements is a distinct, label-preserving permutation of the pixels.
    out = torch.stack([orient(plain[0], e, dims=(1, 2)) for e in range(8)])
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) == 8
    assert torch.allclose(out.sum(dim=(2, 3)), plain[0].sum(dim=(1, 2)).expand(8, 3), atol=1e-3)


def test_augmented_batches_are_turned_images_with_their_labels_and_reuse_gives_the_same_batches(prepared):
    split = open_split(prepared, "train")
    plain = torch.cat([x for x, _ in batches(split, 16, torch.device("cpu"))])
    turned = torch.stack([orient(plain, e) for e in range(8)])  # (8, N, 3, H, W)
    fresh = [(x, y) for x, y in batches(split, 16, torch.device("cpu"), shuffle=True, augment=True, seed=3)]
    assert len({x.data_ptr() for x, _ in fresh}) == len(fresh)  # without reuse, every batch is its own tensor
    found, elements = [], set()
    for x, y in fresh:
        for image, label in zip(x, y):
            hits = (turned - image).abs().amax(dim=(2, 3, 4)) < 1e-5
            element, row = hits.nonzero()[0].tolist()
            assert split.labels[row] == label
            found.append(row)
            elements.add(element)
    assert sorted(found) == list(range(len(split))) and len(elements) == 8
    reused = batches(split, 16, torch.device("cpu"), shuffle=True, augment=True, seed=3, reuse=True)
    pointers = set()
    for (x, y), (want_x, want_y) in zip(reused, fresh, strict=True):
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
        pointers.add(x.data_ptr())
    assert len(pointers) == 1  # one tensor, overwritten batch after batch


@pytest.mark.parametrize("reuse", [False, True])
def test_prefetched_batches_equal_the_ones_gathered_in_line(prepared, reuse):
    # The background-thread gather with two host buffers taking turns (CUDA's path) gives the very same batches.
    split = open_split(prepared, "train")
    settings = dict(shuffle=True, augment=True, seed=5, reuse=reuse)
    in_line = [(x.clone(), y) for x, y in batches(split, 16, torch.device("cpu"), prefetch=False, **settings)]
    prefetched = batches(split, 16, torch.device("cpu"), prefetch=True, **settings)
    for (x, y), (want_x, want_y) in zip(prefetched, in_line, strict=True):
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
