"""The synthetic demo data set: Kaggle layout, a consistent decision tree, the reference task's mix, and pixels
that carry the label."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from galaxy_tune.data.demo import write_demo_data
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.data.kaggle import (
    CLASS_COLUMNS, CSV_NAME, IMAGE_SIZE_PX, IMAGES_DIR, PARENT_ANSWER, question_columns,
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"), num_images=200, seed=0)


@pytest.fixture(scope="module")
def votes(demo_dir):
    return pd.read_csv(demo_dir / CSV_NAME)


def seed_top2_labels(votes: pd.DataFrame) -> pd.Series:
    """The reference task: arg-max over all 37 columns; Class6.2 -> 0, Class1.2 -> 1, anything else dropped."""
    winner = np.array(CLASS_COLUMNS)[votes[CLASS_COLUMNS].to_numpy().argmax(axis=1)]
    labels = pd.Series(winner, index=votes.index).map({"Class6.2": 0, "Class1.2": 1})
    return labels.dropna().astype(int)


def test_layout_matches_kaggle(demo_dir, votes):
    assert list(votes.columns) == ["GalaxyID", *CLASS_COLUMNS]
    assert votes["GalaxyID"].is_unique and votes["GalaxyID"].between(100_000, 999_999).all()
    jpegs = sorted((demo_dir / IMAGES_DIR).glob("*.jpg"))
    assert sorted(int(p.stem) for p in jpegs) == sorted(votes["GalaxyID"])
    for path in jpegs:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (IMAGE_SIZE_PX, IMAGE_SIZE_PX)


def test_votes_follow_the_decision_tree(votes):
    values = votes[CLASS_COLUMNS]
    assert ((values >= 0) & (values <= 1)).all().all()
    for question, parent in PARENT_ANSWER.items():
        reached = 1.0 if parent is None else votes[parent]
        np.testing.assert_allclose(votes[question_columns(question)].sum(axis=1), reached, atol=2e-6)


def test_reference_task_keeps_both_labels_with_class_0_the_majority(votes):
    labels = seed_top2_labels(votes)
    assert 0.8 <= len(labels) / len(votes) <= 0.97
    assert 0.4 <= (labels == 0).mean() <= 0.75


def test_smooth_featured_task_keeps_both_classes(votes):
    confident = votes[votes[["Class1.1", "Class1.2"]].max(axis=1) >= 0.8]
    assert (confident["Class1.1"] > confident["Class1.2"]).sum() >= 20
    assert (confident["Class1.2"] > confident["Class1.1"]).sum() >= 20


def test_pixels_carry_the_label(demo_dir, votes):
    labels = seed_top2_labels(votes)
    features = []
    margin = (IMAGE_SIZE_PX - 256) // 2  # the centre 256 px a model sees
    for galaxy_id in votes.loc[labels.index, "GalaxyID"]:
        with Image.open(demo_dir / IMAGES_DIR / f"{galaxy_id}.jpg") as image:
            crop = image.crop((margin, margin, margin + 256, margin + 256)).resize((16, 16), Image.BILINEAR)
        features.append(np.asarray(crop, np.float32).ravel() / 255)
    features, y = np.stack(features), labels.to_numpy()
    half = len(y) // 2
    model = LogisticRegression(max_iter=2000).fit(features[:half], y[:half])
    accuracy = model.score(features[half:], y[half:])
    majority_share = max(np.mean(y[half:]), 1 - np.mean(y[half:]))
    assert accuracy >= majority_share + 0.15


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    first, again, other = (write_demo_data(tmp_path / str(i), 20, seed) for i, seed in enumerate([1, 1, 2]))
    assert (first / CSV_NAME).read_bytes() == (again / CSV_NAME).read_bytes()
    assert (first / CSV_NAME).read_bytes() != (other / CSV_NAME).read_bytes()
    some_image = sorted((first / IMAGES_DIR).iterdir())[0].name
    assert (first / IMAGES_DIR / some_image).read_bytes() == (again / IMAGES_DIR / some_image).read_bytes()


def test_too_few_images_is_refused(tmp_path):
    with pytest.raises(GalaxyTuneError, match="20 or more"):
        write_demo_data(tmp_path, num_images=19)
