"""The retrain: train each method's best config from scratch, keep its best-val checkpoint, test it once.

Methods: `direct` (the backbone with a fresh 2-class head, no training, as the reference study evaluated it),
`full` and `lora` (the best config of the latest search of that method, or the reference recipe when there is
none). Writes `results/retrain-<timestamp>/` with `test_results.csv`, the trained models and `report.md`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from .data import Prepared, class_counts, data_summary, majority_share

from .errors import GalaxyTuneError
from .export import save_exported
from .loader import open_split
from .model import build_model, count_parameters, describe_weights
from .provenance import library_versions
from .train import (REFERENCE_CONFIGS, TrainConfig, evaluate, fit, load_trainable_state, make_model, pick_device, place,
                    predict_logits)

ALL_METHODS = ("direct", "full", "lora")
SEEDS = 3  # retrained per method by default


@dataclass(frozen=True)
class Recipe:
    """What to retrain for one method, and where it came from."""

    method: str
    config: TrainConfig
    source: str  # the experiment folder, or "reference recipe"
    search_val_accuracy: float | None


def latest_searches(results_dir: Path) -> dict[str, Path]:
    """The newest finished search experiment (one with best.json) of each method."""
    latest: dict[str, tuple[float, Path]] = {}
    for best in Path(results_dir).glob("*/best.json"):
        method = json.loads(best.read_text())["method"]
        if method not in latest or best.stat().st_mtime > latest[method][0]:
            latest[method] = (best.stat().st_mtime, best.parent)
    return {method: folder for method, (_, folder) in latest.items()}


def read_best(experiment: Path) -> dict:
    best = Path(experiment) / "best.json"
    if not best.is_file():
        why = "it is not a search experiment" if not (Path(experiment) / "search.json").is_file() else \
            "it has no finished trial (still running, interrupted or every trial failed)"
        raise GalaxyTuneError(f"--from {experiment}: no best.json, {why}: pass a finished search experiment")
    return json.loads(best.read_text())


def recipes(experiments: dict[str, Path], methods: list[str], max_epochs: int | None) -> list[Recipe]:
    """The config to retrain for each trained method (best of its search, else the reference recipe)."""
    out = []
    for method in methods:
        if method == "direct":
            continue
        if method in experiments:
            best = read_best(experiments[method])
            config, source, val = TrainConfig.from_dict(best["config"]), str(experiments[method]), best["val_accuracy"]
        else:
            config, source, val = REFERENCE_CONFIGS[method], "reference recipe", None
            print(f"{method}: no search found, retraining the reference recipe")
        if max_epochs is not None:
            config = dataclasses.replace(config, epochs=min(config.epochs, max_epochs))
            config.validate()
        out.append(Recipe(method, config, source, val))
    return out


def run_retrain(prepared: Prepared, model_name: str, experiments: dict[str, Path], out_dir: Path,
                methods: list[str] | tuple[str, ...] = ALL_METHODS, seeds: int = SEEDS, max_epochs: int | None = None,
                device: str | None = None, augment: bool = True) -> pd.DataFrame:
    """Retrain and test every method with `seeds` seeds; writes test_results.csv, test_predictions.csv
    (per test image: label, probability of class 1 without and with TTA) and the models under out_dir."""
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise GalaxyTuneError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(ALL_METHODS)}")
    if seeds < 1:
        raise GalaxyTuneError(f"--seeds {seeds} must be at least 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(device)
    splits = {name: open_split(prepared, name) for name in ("train", "val", "test")}
    plans = recipes(experiments, methods, max_epochs)
    tested = []
    progress = tqdm(total=seeds * sum(r.config.epochs for r in plans), desc="retrain", unit="epoch")
    hf_logging.disable_progress_bar()  # one bar: the models' "Writing model shards" would break ours
    for seed in range(seeds):
        if "direct" in methods:
            model = place(build_model(model_name, num_labels=len(prepared.class_names), seed=seed), device)
            tested.append(test_model("direct", seed, None, "no training", model, splits, device, model_name,
                                     train_seconds=0.0, images_seen=0))
        for recipe in plans:
            config = dataclasses.replace(recipe.config, seed=seed, augment=augment and recipe.config.augment)
            model = make_model(config, model_name, num_labels=len(prepared.class_names))
            best: dict = {"val_accuracy": -1.0}

            def keep_best(metrics: dict, state) -> None:
                progress.update()
                progress.set_postfix_str(f"{recipe.method} seed {seed} epoch {metrics['epoch']}/{config.epochs} "
                                         f"val acc {metrics['val_accuracy']:.3f}")
                if metrics["val_accuracy"] > best["val_accuracy"]:
                    best.update(val_accuracy=metrics["val_accuracy"], epoch=metrics["epoch"],
                                state=state(with_optimizer=False))

            started = time.perf_counter()
            history = fit(model, config, splits["train"], splits["val"], device, on_epoch=keep_best)
            seconds = time.perf_counter() - started
            load_trainable_state(model, config, best["state"]["model"])
            save_exported(model, config.to_dict(), recipe.method, prepared, out_dir / f"{recipe.method}-seed{seed}")
            tested.append(test_model(recipe.method, seed, config, recipe.source, model, splits, device,
                                     model_name, train_seconds=seconds, images_seen=history[-1]["images_seen"],
                                     best_epoch=best["epoch"]))
    progress.close()
    results = pd.DataFrame([row for _, row in tested])
    results.to_csv(out_dir / "test_results.csv", index=False)
    pd.concat([predictions for predictions, _ in tested]).to_csv(out_dir / "test_predictions.csv", index=False)
    (out_dir / "retrain.json").write_text(json.dumps({
        "data": data_summary(prepared), "model": model_name, "seeds": seeds, "methods": list(methods),
        "recipes": {r.method: {"source": r.source, "config": r.config.to_dict(),
                               "search_val_accuracy": r.search_val_accuracy} for r in plans},
        "majority_share": majority_share(class_counts(prepared), "test"), "versions": library_versions()}, indent=2))
    return results


def test_model(method: str, seed: int, config: TrainConfig | None, source: str, model, splits, device,
               model_name: str, train_seconds: float, images_seen: int,
               best_epoch: int = 0) -> tuple[pd.DataFrame, dict]:
    """One line of test_results.csv; also collects the per-image test predictions (with and without TTA)."""
    trainable, total = count_parameters(model) if config is not None else (0, count_parameters(model)[1])
    test = splits["test"]
    probs = {name: torch.softmax(torch.from_numpy(predict_logits(model, test, device, tta=tta)), 1).numpy()
             for name, tta in (("plain", False), ("tta", True))}
    predictions = pd.DataFrame({"GalaxyID": test.galaxy_ids, "label": test.labels, "method": method, "seed": seed,
                                "prob_1": probs["plain"][:, 1], "prob_1_tta": probs["tta"][:, 1]})
    val_accuracy = evaluate(model, splits["val"], device)["accuracy"]
    return predictions, {"method": method, "seed": seed, "val_accuracy": val_accuracy,
            "test_accuracy": float((probs["plain"].argmax(1) == test.labels).mean()),
            "test_accuracy_tta": float((probs["tta"].argmax(1) == test.labels).mean()), "trainable_params": trainable,
            "total_params": total, "epochs": config.epochs if config else 0, "best_epoch": best_epoch,
            "train_seconds": round(train_seconds, 1), "images_seen": images_seen, "model": model_name,
            "weights": describe_weights(model_name, seed), "source": source,
            "config": json.dumps(config.searched() if config else {})}
