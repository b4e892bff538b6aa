"""A small synthetic Galaxy Zoo data set in the exact Kaggle layout, for demos and tests.

Each image is a rendered galaxy: a smooth, red Sérsic elliptical, a featured, blue disc with spiral arms (and
sometimes a bar), or a bright point source (a star/artifact), on a noisy sky with a few foreground stars.
Its vote fractions follow the Galaxy Zoo decision tree exactly and agree with what was drawn, so a classifier
can learn the labels from the pixels.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import GalaxyTuneError
from .kaggle import (
    ANSWERS_PER_QUESTION, CLASS_COLUMNS, CSV_NAME, IMAGE_SIZE_PX, IMAGES_DIR, PARENT_ANSWER,
)

MIN_IMAGES = 20
# The built-in demo: its data set and the demo-sized settings that finish in minutes on a 2-core CPU.
DEMO = {"num_images": 600, "image_size_px": 64, "crop_px": 256, "num_samples": 6, "max_epochs": 4, "seeds": 2,
        "top_k": 1}
DEMO_FOLDER = "demo-data"  # under --results-dir
SMOOTH, FEATURED, ARTIFACT = 0, 1, 2
KIND_SHARES = (0.55, 0.38, 0.07)
MICRO = 1_000_000  # vote fractions are kept as integer millionths so every question sums exactly
_FIRST_GALAXY_ID = 100_008
_GRID = np.mgrid[:IMAGE_SIZE_PX, :IMAGE_SIZE_PX].astype(np.float32) - (IMAGE_SIZE_PX - 1) / 2  # (y, x)
_STAR_PATCH_PX = 25
_STAR_PATCH = np.mgrid[:_STAR_PATCH_PX, :_STAR_PATCH_PX].astype(np.float32) - _STAR_PATCH_PX // 2  # (y, x)


def demo_data_dir(results_dir: Path) -> Path:
    """The built-in demo data set under `results_dir`, generated on first use."""
    folder = Path(results_dir) / DEMO_FOLDER
    if not (folder / CSV_NAME).is_file():
        print(f"generating the demo data set ({DEMO['num_images']} synthetic galaxies) in {folder}")
        write_demo_data(folder, num_images=DEMO["num_images"], seed=0)
    return folder


def write_demo_data(out_dir: Path, num_images: int = 600, seed: int = 0) -> Path:
    """Write `num_images` synthetic galaxies and their vote fractions under `out_dir`; return `out_dir`.

    The CSV is written last and atomically, so a folder holding it holds a complete data set.
    """
    max_images = MICRO - _FIRST_GALAXY_ID
    if num_images < MIN_IMAGES:
        raise GalaxyTuneError(f"num_images={num_images} is too few: ask for {MIN_IMAGES} or more.")
    if num_images > max_images:
        raise GalaxyTuneError(f"num_images={num_images} overflows 6-digit GalaxyIDs: ask for {max_images} or fewer.")
    table_seed, *image_seeds = np.random.SeedSequence(seed).spawn(num_images + 1)
    rng = np.random.default_rng(table_seed)
    galaxy_ids = _FIRST_GALAXY_ID + np.sort(rng.choice(max_images, num_images, replace=False))
    params = _draw_galaxies(rng, num_images)
    votes = _draw_votes(rng, params)
    noise_field = rng.standard_normal((3, 2 * IMAGE_SIZE_PX, 2 * IMAGE_SIZE_PX), dtype=np.float32)

    out_dir = Path(out_dir)
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)

    def write_image(i: int) -> None:
        galaxy = {name: values[i].tolist() for name, values in params.items()}
        pixels = _render(np.random.default_rng(image_seeds[i]), galaxy, noise_field)
        Image.fromarray(pixels).save(images_dir / f"{galaxy_ids[i]}.jpg", quality=90)

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # numpy and JPEG encoding release the GIL
        list(pool.map(write_image, range(num_images)))

    rows = [",".join(["GalaxyID", *CLASS_COLUMNS])]
    rows += [f"{gid}," + ",".join(f"{v / MICRO:.6f}" for v in row) for gid, row in zip(galaxy_ids, votes)]
    tmp_path = out_dir / f".{CSV_NAME}.tmp"
    tmp_path.write_text("\n".join(rows) + "\n")
    os.replace(tmp_path, out_dir / CSV_NAME)
    return out_dir


def _draw_galaxies(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """What each image shows: its kind (smooth, featured or artifact) and the shape of its galaxy."""
    kind = rng.choice(3, size=n, p=KIND_SHARES)
    featured = kind == FEATURED
    axis_ratio = np.where(featured, rng.uniform(0.2, 1.0, n), rng.uniform(0.4, 1.0, n))
    edge_on = featured & (axis_ratio < 0.3)
    return {
        "kind": kind,
        "axis_ratio": axis_ratio,  # for discs, the cosine of the inclination
        "edge_on": edge_on,
        "angle": rng.uniform(0, np.pi, n),
        "size_px": np.where(featured, rng.uniform(25, 70, n), rng.uniform(15, 45, n)),
        "sersic_n": rng.uniform(1.5, 4.0, n),
        "brightness": np.exp(rng.uniform(np.log(0.5), np.log(2.0), n)),
        "bulge_share": rng.uniform(0.05, 0.6, n),
        "has_bar": featured & ~edge_on & (rng.random(n) < 0.35),
        "n_arms": rng.integers(2, 5, n),
        "pitch_deg": rng.uniform(10, 35, n),
        "arm_phase": rng.uniform(0, 2 * np.pi, n),
        "centre_px": rng.normal(0, 3, (n, 2)),
    }


def _draw_votes(rng: np.random.Generator, g: dict[str, np.ndarray]) -> np.ndarray:
    """Vote fractions (integer millionths, one column per CLASS_COLUMNS entry) that agree with each galaxy.

    Featured galaxies and artifacts mostly get enough "odd" votes for their Q1 answer to beat "nothing odd"
    (Class6.2); smooth galaxies and a few featured ones (label noise) do not.
    """
    n, kind = len(g["kind"]), g["kind"]
    top = rng.uniform(*np.array([(0.5, 0.92), (0.62, 0.97), (0.55, 0.9)])[kind].T)
    runner_up = np.where(kind == SMOOTH, FEATURED, SMOOTH)
    share = rng.uniform(0.7, 1.0, n)
    q1 = np.empty((n, 3))
    q1[np.arange(n), kind] = top
    q1[np.arange(n), runner_up] = (1 - top) * share
    q1[np.arange(n), 3 - kind - runner_up] = (1 - top) * (1 - share)
    beats_nothing_odd = (kind == ARTIFACT) | ((kind == FEATURED) & (rng.random(n) > 0.12))
    odd_enough_to_win = np.minimum(1 - top + rng.uniform(0.03, 0.2, n), 1)
    odd = np.where(beats_nothing_odd, odd_enough_to_win, rng.uniform(0.02, 0.15, n))

    odd_feature = np.where(kind == ARTIFACT, 4, rng.integers(0, 7, n))  # 4: "other"
    preferred = {
        2: np.where(g["edge_on"], 0, 1),
        3: np.where(g["has_bar"], 0, 1),
        4: np.where((kind == FEATURED) & ~g["edge_on"], 0, 1),
        5: np.digitize(g["bulge_share"], [0.1, 0.25, 0.45]),
        7: 2 - np.digitize(g["axis_ratio"], [0.5, 0.8]),
        8: odd_feature,
        9: 2 - np.digitize(g["bulge_share"], [0.1, 0.25]),
        10: np.digitize(g["pitch_deg"], [15, 25]),
        11: g["n_arms"] - 1,
    }
    weights = {1: q1, 6: np.stack([odd, 1 - odd], axis=1)}
    weights |= {q: _agreeing_votes(rng, answer, ANSWERS_PER_QUESTION[q]) for q, answer in preferred.items()}

    columns: dict[str, np.ndarray] = {}
    for question in ANSWERS_PER_QUESTION:  # in tree order: every parent answer comes before its question
        parent = PARENT_ANSWER[question]
        reached = np.full(n, MICRO) if parent is None else columns[parent]
        answers = _split(reached, weights[question])
        columns |= {f"Class{question}.{a + 1}": answers[:, a] for a in range(answers.shape[1])}
    return np.stack([columns[c] for c in CLASS_COLUMNS], axis=1)


def _agreeing_votes(rng: np.random.Generator, answer: np.ndarray, num_answers: int) -> np.ndarray:
    """Dirichlet vote shares over `num_answers` answers, most of them for each galaxy's `answer`."""
    alpha = np.full((len(answer), num_answers), 0.6)
    alpha[np.arange(len(answer)), answer] += 6.0
    return rng.gamma(alpha)


def _split(reached: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Split integer vote totals in proportion to `weights`; the rounding residue goes to the largest answer."""
    shares = weights / weights.sum(axis=1, keepdims=True)
    parts = np.floor(reached[:, None] * shares).astype(np.int64)
    parts[np.arange(len(parts)), shares.argmax(axis=1)] += reached - parts.sum(axis=1)
    return parts


def _render(rng: np.random.Generator, g: dict, noise_field: np.ndarray) -> np.ndarray:
    """One 424x424 RGB uint8 image of galaxy `g` on a noisy sky with a few foreground stars.

    The Gaussian noise is a random window of the shared `noise_field`: fresh draws would dominate the run time.
    """
    y, x = _GRID[0] - g["centre_px"][0], _GRID[1] - g["centre_px"][1]
    if g["kind"] == SMOOTH:
        u, v = _rotate(x, y, g["angle"], g["axis_ratio"])
        glow = _sersic(np.hypot(u, v), g["size_px"], g["sersic_n"])
        components = [(0.08 * glow, (1.0, 0.75, 0.5))]
    elif g["kind"] == FEATURED:
        components = _disc_galaxy(x, y, g)
    else:
        components = [(_star(x, y, 2.5), (0.9, 0.95, 1.0))]
    flux = np.zeros((3, IMAGE_SIZE_PX, IMAGE_SIZE_PX), np.float32)
    for image, colour in components:
        rgb = g["brightness"] * np.asarray(colour) * np.exp(rng.normal(0, 0.08, 3))  # a little colour scatter
        flux += rgb.astype(np.float32)[:, None, None] * image
    for _ in range(rng.integers(1, 5)):  # foreground stars: their light is negligible outside a small patch
        top, left = rng.integers(0, IMAGE_SIZE_PX - _STAR_PATCH_PX, 2)
        star = rng.uniform(0.05, 0.6) * _star(_STAR_PATCH[1], _STAR_PATCH[0], rng.uniform(0.8, 1.8))
        patch = flux[:, top:top + _STAR_PATCH_PX, left:left + _STAR_PATCH_PX]
        patch += rng.uniform(0.6, 1.0, 3).astype(np.float32)[:, None, None] * star
    flux += rng.uniform(0.001, 0.006)  # sky
    noise = flux / 400 + rng.uniform(0.002, 0.006) ** 2  # variance: photon noise plus read noise
    top, left = rng.integers(0, noise_field.shape[1] - IMAGE_SIZE_PX, 2)
    flux += np.sqrt(noise, out=noise) * noise_field[:, top:top + IMAGE_SIZE_PX, left:left + IMAGE_SIZE_PX]
    return _asinh_stretch(flux)


def _rotate(x: np.ndarray, y: np.ndarray, angle: float, axis_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along the major and (stretched by 1/axis_ratio) minor axis of an ellipse at `angle`."""
    c, s = np.cos(angle), np.sin(angle)
    return x * c + y * s, (y * c - x * s) / axis_ratio


def _sersic(r: np.ndarray, effective_radius: float, n: float) -> np.ndarray:
    """Sérsic surface brightness, 1 at the effective radius (half the light inside it)."""
    b = 2 * n - 1 / 3
    return np.exp(-b * ((r / effective_radius) ** (1 / n) - 1))


def _star(x: np.ndarray, y: np.ndarray, sigma_px: float) -> np.ndarray:
    """A point source: a Gaussian core with a faint wide halo, peak 1."""
    r2 = x * x + y * y
    return np.exp(-r2 / (2 * sigma_px**2)) + 0.02 * np.exp(-np.sqrt(r2) / (3 * sigma_px))


def _disc_galaxy(x: np.ndarray, y: np.ndarray, g: dict) -> list[tuple[np.ndarray, tuple[float, ...]]]:
    """A yellow bulge, a blue exponential disc with logarithmic spiral arms and maybe a bar, seen inclined."""
    scale_px = g["size_px"] / 3
    u, v = _rotate(x, y, g["angle"], g["axis_ratio"])
    r = np.hypot(u, v) + 1e-3
    winding = 1 / np.tan(np.radians(g["pitch_deg"]))
    phase = g["n_arms"] * (np.arctan2(v, u) - winding * np.log(r / scale_px)) + g["arm_phase"]
    arms = ((1 + np.cos(phase)) / 2) ** 3 * (1 - np.exp(-((r / scale_px) ** 2)))
    disc = 0.08 / np.sqrt(g["axis_ratio"]) * np.exp(-r / scale_px) * (0.35 + 2.5 * arms)
    bulge = 0.1 * g["bulge_share"] * _sersic(np.hypot(x, y), 0.4 * scale_px, 2.0)
    components = [(disc, (0.55, 0.75, 1.0)), (bulge, (1.0, 0.85, 0.6))]
    if g["has_bar"]:
        bar_angle = winding * np.log(1.2) - g["arm_phase"] / g["n_arms"]  # the arms start at the bar's ends
        along, across = _rotate(u, v, bar_angle, 1.0)
        bar = 0.15 * np.exp(-((along / (1.2 * scale_px)) ** 2) - (across / (0.3 * scale_px)) ** 2)
        components.append((bar, (1.0, 0.9, 0.7)))
    return components


def _asinh_stretch(flux: np.ndarray) -> np.ndarray:
    """SDSS-style colour-preserving asinh stretch of (3, H, W) flux to (H, W, 3) uint8 (Lupton et al. 2004).

    Works in place on `flux`: fresh full-size temporaries cost more than the arithmetic.
    """
    np.maximum(flux, 0, out=flux)
    intensity = (flux[0] + flux[1] + flux[2]) / 3 + 1e-6
    scale = np.arcsinh(intensity / 0.02) / (np.arcsinh(1 / 0.02) * intensity)
    scale /= np.maximum(flux.max(axis=0) * scale, 1)  # saturate bright pixels without changing their colour
    flux *= 255 * scale
    flux += 0.5
    return np.ascontiguousarray(flux.transpose(1, 2, 0), dtype=np.uint8)
