"""Decoding galaxy JPEGs into the pixel cache, on every core: the single decode pass that also checks each image.

Decoding runs in a process pool whose workers write their rows straight into the memory-mapped temporary cache
and send back only the rows that failed. `data.prepare` and `data.build_cache` drive it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin
from tqdm import tqdm

from ..errors import GalaxyTuneError
from .kaggle import CSV_NAME, IMAGE_SIZE_PX, IMAGES_DIR
from ..layout import new_folder, write_atomically

CHUNK_ROWS = 256  # images per task sent to a decoding process: about 0.5-1 s of work at 224 px
POOL_MIN_IMAGES = 1000  # with the default --workers, fewer images are decoded in-process (no pool to start)


class NotGalaxyImage(ValueError):
    """A readable image that is not a 424x424 RGB JPEG."""


def decode(path: Path, image_size_px: int, crop_px: int | None) -> np.ndarray:
    """One galaxy JPEG as (3, size, size) uint8: centre-crop, then resize, as the reference's transforms do.

    Channels first, as the model reads them: a batch then converts to float without transposing. The size is
    checked from the JPEG header before any pixel is decoded (see `open_jpeg`).
    """
    with open_jpeg(path) as image:
        if image.format != "JPEG" or image.mode != "RGB" or image.size != (IMAGE_SIZE_PX, IMAGE_SIZE_PX):
            raise NotGalaxyImage(f"not a {IMAGE_SIZE_PX}x{IMAGE_SIZE_PX} RGB JPEG ({image.format} {image.mode} "
                                 f"{image.size[0]}x{image.size[1]})")
        crop = crop_px or IMAGE_SIZE_PX
        # Let libjpeg decode at a reduced scale when the output is small: same pixels, several times faster.
        image.draft("RGB", (IMAGE_SIZE_PX * image_size_px // crop,) * 2)
        scale = image.size[0] / IMAGE_SIZE_PX
        lo, hi = (IMAGE_SIZE_PX - crop) / 2 * scale, (IMAGE_SIZE_PX + crop) / 2 * scale
        image = image.resize((image_size_px, image_size_px), Image.Resampling.BILINEAR, box=(lo, lo, hi, hi))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def open_jpeg(path: Path) -> JpegImagePlugin.JpegImageFile:
    """The JPEG at `path`, its header read and no pixel decoded yet.

    Not `Image.open`, whose decompression-bomb check raises (over 179 Mpx) or prints a warning (over 89 Mpx) from
    the header alone: a huge image is a wrong-sized galaxy, listed with the other bad images.
    """
    return JpegImagePlugin.JpegImageFile(str(path))


def source_fingerprint(data_dir: Path, ids: np.ndarray) -> str:
    """Changes when the CSV or any listed image file changes (size or modification time)."""
    digest = hashlib.sha256()
    for path in [Path(data_dir) / CSV_NAME, *(image_path(data_dir, i) for i in ids)]:
        try:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        except FileNotFoundError:
            digest.update(f"{path.name}:missing;".encode())
    return digest.hexdigest()[:16]


def image_path(data_dir: Path, galaxy_id: int) -> Path:
    return Path(data_dir) / IMAGES_DIR / f"{galaxy_id}.jpg"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells it, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_rows(cache: Path, data_dir: Path, ids: np.ndarray, image_size_px: int, crop_px: int | None,
                workers: int | None = None, desc: str = "decoding") -> dict[int, str]:
    """Decode image i of `ids` into row i of the .npy file `cache`; GalaxyID -> what is wrong, for every failure.

    A missing, unreadable, truncated or mis-sized image leaves its row as it was and is reported, never raised, so
    one pass lists them all. `workers` processes share the work in chunks of up to CHUNK_ROWS images; 1 decodes
    here, None takes one per core (here too when there are under POOL_MIN_IMAGES images: a pool would not pay).
    """
    count = usable_cores() if workers is None else workers
    if workers is None and len(ids) < POOL_MIN_IMAGES:
        count = 1
    # About four chunks per process at least, so that the last ones to finish are short.
    size = max(1, min(CHUNK_ROWS, math.ceil(len(ids) / (4 * count))))
    chunks = [(start, ids[start:start + size]) for start in range(0, len(ids), size)]
    count = min(count, len(chunks))
    failed: list[tuple[int, str]] = []
    offset = np.load(cache, mmap_mode="r").offset  # where row 0 starts, after the .npy header
    args = (str(cache), offset, str(data_dir), image_size_px, crop_px)
    with tqdm(total=len(ids), desc=desc, unit="img", leave=False) as bar:
        if count <= 1:
            for start, chunk in chunks:
                failed += _decode_chunk(*args, start, chunk)
                bar.update(len(chunk))
        else:
            stop = pool_context().Event()
            with process_pool(count, stop) as pool:
                pending = {pool.submit(_decode_chunk, *args, start, chunk): len(chunk) for start, chunk in chunks}
                try:
                    while pending:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            failed += future.result()
                            bar.update(pending.pop(future))
                except BrokenProcessPool:
                    raise GalaxyTuneError(
                        f"a decoding process died: out of memory, out of disk space for the cache in {cache.parent}, "
                        "or a script that calls galaxy_tune without `if __name__ == '__main__':` (each decoding "
                        "process runs the script's top level again): free some, add that guard, or pass --workers 1"
                    ) from None
                finally:
                    stop.set()  # after an error or Ctrl-C, the processes drop their chunks at the next image
                    for future in pending:
                        future.cancel()
    return {int(ids[row]): why for row, why in sorted(failed)}


def _decode_chunk(cache: str, offset: int, data_dir: str, image_size_px: int, crop_px: int | None, start: int,
                  ids: np.ndarray) -> list[tuple[int, str]]:
    """Decode `ids` into rows start, start + 1, ... of the cache (its data at byte `offset`) and write them to disk.

    Returns (row, what is wrong) for every image that failed. Only this chunk's rows are mapped, and they are
    written out before returning, while the other processes decode: no long serial write at the end.
    """
    shape = (len(ids), 3, image_size_px, image_size_px)
    pixels = np.memmap(cache, np.uint8, "r+", offset=offset + start * math.prod(shape[1:]), shape=shape)
    failed = []
    for row, galaxy_id in enumerate(ids):
        if _stop is not None and _stop.is_set():
            break
        path = image_path(Path(data_dir), galaxy_id)
        try:
            pixels[row] = decode(path, image_size_px, crop_px)
        except FileNotFoundError:
            failed.append((start + row, "missing"))
        except NotGalaxyImage as err:
            failed.append((start + row, str(err)))
        except (OSError, SyntaxError, ValueError) as err:
            failed.append((start + row, f"unreadable ({err})"))
    pixels.flush()  # msync of these rows only
    del pixels
    return failed


def process_pool(workers: int, stop=None) -> ProcessPoolExecutor:
    """`workers` decoding processes, which give up their chunks once the event `stop` (if any) is set."""
    return ProcessPoolExecutor(workers, mp_context=pool_context(), initializer=_start_worker, initargs=(stop,))


def pool_context() -> multiprocessing.context.BaseContext:
    """Processes forked from a fresh, single-threaded server that imported this module once.

    Not forked from this process, which may run threads (torch, Ray) that a fork would copy mid-flight; and not
    spawned, which would import numpy, pandas and Pillow again in every process of every pool (0.6 s each).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # no effect once the server runs: it started with this list
    return context


_stop = None  # in a decoding process: the event that tells it to stop


def _start_worker(stop) -> None:
    """Ctrl-C goes to the whole process group: the parent stops the processes through `stop`, in order."""
    global _stop
    _stop = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def temporary_cache(path: Path, count: int, image_size_px: int) -> Iterator[Path]:
    """A zeroed (count, 3, size, size) uint8 .npy next to `path`, removed on leaving unless moved to `path`.

    Moving it with os.replace is atomic: concurrent readers see the old cache or the whole new one, and a
    half-written cache never outlives an error or Ctrl-C.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with new_folder(path.parent):  # removed again if a failure leaves it empty
        try:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(count, 3, image_size_px, image_size_px))
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)


def finish_cache(tmp: Path, path: Path, meta: dict) -> None:
    """Flush the temporary cache to disk, move it into place and record what it was made from."""
    pixels = np.load(tmp, mmap_mode="r+")
    pixels.flush()  # msync: the chunks are on disk already; this waits for any write still under way
    del pixels
    os.replace(tmp, path)
    write_atomically(path.with_suffix(".json"), json.dumps(meta))


def keep_rows(cache: Path, rows: np.ndarray) -> None:
    """Shrink the .npy file `cache` in place to the given rows (ascending), in that order."""
    pixels = np.load(cache, mmap_mode="r+")
    for start in range(0, len(rows), CHUNK_ROWS):  # row i moves to i or before, never over a row still to move
        picked = rows[start:start + CHUNK_ROWS]
        pixels[start:start + len(picked)] = pixels[picked]
    shape, offset, row_bytes = (len(rows), *pixels.shape[1:]), pixels.offset, pixels[0].nbytes
    pixels.flush()
    del pixels
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    if header.tell() != offset:  # numpy pads the header so that the first dimension can change in place
        raise RuntimeError(f"the .npy header of {cache} changed size")
    with open(cache, "r+b") as file:
        file.write(header.getvalue())
        file.truncate(offset + len(rows) * row_bytes)
