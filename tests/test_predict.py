"""predict: a folder of galaxy JPEGs in, one probability per class out, exactly as the retrain's test computes them."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import ResNetForImageClassification

from conftest import CROP_PX, IMAGE_SIZE_PX, jpeg_claiming
from galaxy_tune.cli import main
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.models.export import MODEL_INFO
from galaxy_tune.data.kaggle import IMAGES_DIR
from galaxy_tune.data.loader import ImageSplit, open_split
from galaxy_tune.models.backbone import build_model
from galaxy_tune.predict import predict_folder
from galaxy_tune.train import pick_device, place, predict_logits

CLASS_NAMES = ["Class6.2", "Class1.2"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model exported as retrain exports one: save_pretrained with class names, plus galaxy_tune.json."""
    model = build_model("tiny", num_labels=2, seed=3)
    model.config.id2label = dict(enumerate(CLASS_NAMES))
    model.config.label2id = {name: i for i, name in enumerate(CLASS_NAMES)}
    folder = tmp_path_factory.mktemp("full-seed0") / "hf"
    model.save_pretrained(folder)
    (folder / MODEL_INFO).write_text(json.dumps({"image_size_px": IMAGE_SIZE_PX, "crop_px": CROP_PX,
                                                 "class_names": CLASS_NAMES, "task": "seed-top2"}))
    return folder


def whole_cache(prepared) -> ImageSplit:
    """Every galaxy of the prepared pixel cache, as one split."""
    manifest = prepared.manifest()
    return ImageSplit(np.load(prepared.cache_path, mmap_mode="r"), np.arange(len(manifest)),
                      manifest["label"].to_numpy(copy=True), manifest["GalaxyID"].to_numpy(copy=True))


def test_predict_writes_galaxy_ids_and_one_probability_per_class(exported, demo_dir, tmp_path):
    out = tmp_path / "out" / "predictions.csv"
    table = predict_folder(exported, demo_dir / IMAGES_DIR, out)
    written = pd.read_csv(out)
    assert list(written.columns) == ["GalaxyID", *CLASS_NAMES]
    stems = sorted(int(p.stem) for p in (demo_dir / IMAGES_DIR).glob("*.jpg"))
    assert written["GalaxyID"].tolist() == stems
    assert np.allclose(written[CLASS_NAMES].sum(axis=1), 1.0, atol=1e-6)
    assert written[CLASS_NAMES].to_numpy() == pytest.approx(table[CLASS_NAMES].to_numpy(), abs=1e-7)


def test_predict_from_python_returns_the_table_and_writes_no_file_unless_asked(exported, demo_dir, tmp_path,
                                                                               monkeypatch):
    from galaxy_tune import api

    monkeypatch.chdir(tmp_path)
    table = api.predict(exported, demo_dir / IMAGES_DIR)
    assert list(table.columns) == ["GalaxyID", *CLASS_NAMES] and list(tmp_path.iterdir()) == []
    asked = api.predict(exported, demo_dir / IMAGES_DIR, out_csv="p.csv")
    assert pd.read_csv(tmp_path / "p.csv")["GalaxyID"].tolist() == asked["GalaxyID"].tolist()


@pytest.mark.parametrize("tta", [False, True])
def test_predictions_match_the_retrain_test_on_the_pixel_cache(exported, demo_dir, prepared, tmp_path, tta):
    # The same JPEGs, decoded by prepare into the cache, classified as retrain's test_model does.
    # Both on the device every command picks by default: the CPU here, CUDA (bf16) on a GPU machine.
    device = pick_device()
    table = predict_folder(exported, demo_dir / IMAGES_DIR, tmp_path / "p.csv", tta=tta).set_index("GalaxyID")
    cache = whole_cache(prepared)
    model = place(ResNetForImageClassification.from_pretrained(exported), device)
    expected = torch.softmax(torch.from_numpy(predict_logits(model, cache, device, tta=tta)), 1).numpy()
    tolerance = 1e-5 if device.type == "cpu" else 1e-2  # cuDNN may pick other bf16 kernels for other batches
    assert table.loc[cache.galaxy_ids, CLASS_NAMES].to_numpy() == pytest.approx(expected, abs=tolerance)


def test_tta_changes_predictions_and_is_invariant_to_rotating_or_flipping_a_galaxy(exported, prepared):
    model = ResNetForImageClassification.from_pretrained(exported)
    test = open_split(prepared, "test")
    pixels = np.asarray(test.pixels[test.rows])
    turned = [np.rot90(pixels, k=1, axes=(2, 3)), np.flip(pixels, axis=3), np.rot90(pixels, k=3, axes=(2, 3))]

    def logits(images, tta):
        split = ImageSplit(np.ascontiguousarray(images), np.arange(len(images)), test.labels, test.galaxy_ids)
        return predict_logits(model, split, CPU, tta=tta)

    plain, averaged = logits(pixels, False), logits(pixels, True)
    assert not np.allclose(plain, averaged, atol=1e-4)
    for images in turned:
        assert not np.allclose(logits(images, False), plain, atol=1e-4)  # the model itself is not invariant...
        assert logits(images, True) == pytest.approx(averaged, abs=1e-5)  # ...its 8-view average is


def test_a_model_without_galaxy_tune_json_needs_the_image_size(exported, demo_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(exported, bare)
    (bare / MODEL_INFO).unlink()
    with pytest.raises(GalaxyTuneError, match="pass --image-size"):
        predict_folder(bare, demo_dir / IMAGES_DIR, tmp_path / "p.csv")
    given = predict_folder(bare, demo_dir / IMAGES_DIR, tmp_path / "p.csv", image_size_px=IMAGE_SIZE_PX,
                           crop_px=CROP_PX)
    assert given.equals(predict_folder(exported, demo_dir / IMAGES_DIR, tmp_path / "q.csv"))


def good_images(demo_dir, tmp_path):
    """A folder of three good galaxy JPEGs."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((demo_dir / IMAGES_DIR).glob("*.jpg"))[:3]:
        shutil.copy(path, folder)
    return folder


def test_every_bad_jpeg_is_named_in_one_run_and_nothing_is_written(exported, demo_dir, tmp_path):
    folder = good_images(demo_dir, tmp_path)
    good = next(folder.iterdir()).read_bytes()
    (folder / "999997.jpg").write_bytes(b"these are not the pixels you are looking for")
    (folder / "999998.jpg").write_bytes(good[:len(good) // 3])
    (folder / "999999.jpg").write_bytes(jpeg_claiming(20000))  # a decompression bomb by its header
    with pytest.raises(GalaxyTuneError) as err:
        predict_folder(exported, folder, tmp_path / "p.csv")
    message = str(err.value)
    assert message.startswith(f"3 bad image(s) in {folder}: 999997.jpg: unreadable") and "move them out" in message
    assert "999998.jpg: unreadable" in message and "999999.jpg: not a 424x424 RGB JPEG (JPEG RGB 20000x20000)" in message
    assert not (tmp_path / "p.csv").exists()


def test_out_naming_a_folder_writes_predictions_csv_inside_it(exported, demo_dir, tmp_path, capsys):
    folder, out = good_images(demo_dir, tmp_path), tmp_path / "out"
    out.mkdir()
    assert main(["predict", "--model", str(exported), "--images", str(folder), "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "predictions.csv")) == 3
    assert f"wrote 3 predictions to {out / 'predictions.csv'}" in capsys.readouterr().out


@pytest.mark.parametrize("case, culprit", [
    ("no image folder", "image folder .*missing does not exist"),
    ("empty image folder", "no .jpg files in"),
    ("no model folder", "model folder .*missing does not exist: pass the hf/ folder"),
    ("conflicting image size", "--image-size 64 differs from the 32 the model was trained with"),
])
def test_bad_arguments_are_refused_with_the_fix(exported, demo_dir, tmp_path, case, culprit):
    model, images, size = exported, demo_dir / IMAGES_DIR, None
    if case == "no image folder":
        images = tmp_path / "missing"
    elif case == "empty image folder":
        images = tmp_path
    elif case == "no model folder":
        model = tmp_path / "missing"
    else:
        size = 64
    with pytest.raises(GalaxyTuneError, match=culprit):
        predict_folder(model, images, tmp_path / "p.csv", image_size_px=size)
