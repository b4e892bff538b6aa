"""Reading a retrain folder's runs: which rows a report shows, and each run's test predictions and confidences."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from ..errors import GalaxyTuneError
from .figure import METHOD_ORDER


def present(frame: pd.DataFrame) -> list[str]:
    """The methods in `frame`, in report order."""
    return [m for m in METHOD_ORDER if m in set(frame["method"])]


def with_ranks(frame: pd.DataFrame) -> pd.DataFrame:
    """Retrains from before top-k selection trained one config per method: rank 1, selected."""
    return frame.assign(**{k: v for k, v in (("rank", 1), ("selected", True)) if k not in frame})


def selected_runs(results: pd.DataFrame, predictions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rows of each method's selected config (chosen on val accuracy by the retrain); retrains from before
    top-k selection have one config per method, all of them selected."""
    if "selected" not in results:
        return results, predictions
    chosen = results[results["selected"]]
    keys = set(zip(chosen["method"], chosen["rank"]))
    return chosen.reset_index(drop=True), predictions[[k in keys for k in zip(predictions["method"],
                                                                               predictions["rank"])]]


def predicted_class(probability_1: pd.Series) -> np.ndarray:
    """Class of each image from P(class 1): argmax of two probabilities, ties going to class 0 as argmax does."""
    return (probability_1.to_numpy() > 0.5).astype(np.int64)


def seed_predictions(predictions: pd.DataFrame, method: str, seed: int, rank: int | None = None) -> pd.DataFrame:
    """One method's test predictions of one seed (and config rank), in GalaxyID order (the same images for every
    method)."""
    keep = (predictions["method"] == method) & (predictions["seed"] == seed)
    if rank is not None and "rank" in predictions:
        keep &= predictions["rank"] == rank
    return predictions[keep].sort_values("GalaxyID").reset_index(drop=True)


def paired_seeds(predictions: pd.DataFrame) -> Iterator[tuple[int, pd.DataFrame, pd.DataFrame]]:
    """(seed, full's, LoRA's test predictions) for each seed both methods ran, checked to be on the same images."""
    seeds = sorted(set(predictions.loc[predictions["method"] == "full", "seed"]) &
                   set(predictions.loc[predictions["method"] == "lora", "seed"]))
    for seed in seeds:
        full, lora = seed_predictions(predictions, "full", seed), seed_predictions(predictions, "lora", seed)
        if not full["GalaxyID"].equals(lora["GalaxyID"]):
            raise GalaxyTuneError(f"full and lora seed {seed} were tested on different images: rerun the retrain")
        yield seed, full, lora


def correct_and_confidence(picked: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Whether each prediction is right, and its confidence (probability of the answer given), without TTA."""
    probability_1 = picked["prob_1"].to_numpy()
    return (predicted_class(picked["prob_1"]) == picked["label"].to_numpy(),
            np.maximum(probability_1, 1 - probability_1))


def logits_of(picked: pd.DataFrame) -> np.ndarray:
    """The uncalibrated logits logit_0, logit_1, ... of each prediction."""
    columns = sorted((c for c in picked if c.startswith("logit_")), key=lambda c: int(c.split("_")[1]))
    return picked[columns].to_numpy(dtype=float)
