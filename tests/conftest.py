"""Shared fixtures: a small generated Kaggle-format data set, its prepared cache, one local Ray; a bomb JPEG."""

import io
import struct
from pathlib import Path

import pytest
from PIL import Image

from galaxy_tune.data.prepare import DataConfig, prepare
from galaxy_tune.data.demo import write_demo_data

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE_SIZE_PX, CROP_PX = 32, 256


def jpeg_claiming(side: int) -> bytes:
    """A tiny JPEG whose header claims side x side pixels: a decompression bomb to PIL, in 631 bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 40, 40)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")  # SOF0: marker, length, precision, then height and width
    data[frame + 5:frame + 9] = struct.pack(">HH", side, side)
    return bytes(data)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """120 synthetic galaxies in the exact Kaggle layout (read-only for tests: copy it to modify it)."""
    return write_demo_data(tmp_path_factory.mktemp("demo"), num_images=120, seed=1)


@pytest.fixture(scope="session")
def prepared(demo_dir, tmp_path_factory):
    """The demo data prepared at 32 px: split manifest and pixel cache."""
    config = DataConfig(demo_dir, image_size_px=IMAGE_SIZE_PX, crop_px=CROP_PX)
    return prepare(config, tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray (2 CPUs, no dashboard) for every test that runs a search."""
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)  # the same on a GPU machine
    yield ray
    ray.shutdown()
