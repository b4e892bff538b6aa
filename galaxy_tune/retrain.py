"""The retrain: train the top configs of each method's search from scratch over seeds, keep each run's best-val
checkpoint, pick each method's config on validation data alone, and test.

Methods: `direct` (the backbone with a fresh head, no training, as the reference study evaluated it),
`full` and `lora` (the `top_k` best configs of the latest search of that method, or the reference recipe when
there is none). The config a method reports is the one with the best mean *val* metric (the task's: accuracy, or
RMSE) over the seeds, chosen before any test number is looked at; the others show how much of the search's best
was luck. Every classifier gets a temperature fitted on the val split (calibration). Writes
`results/retrain-<timestamp>/` with
`test_results.csv`, `test_predictions.csv`, the trained models and `report.md`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from . import layout
from .models.calibration import fit_temperature, nll, probabilities
from .data.prepare import Prepared, data_summary, read_consensus
from .errors import GalaxyTuneError, Stopped
from .models.export import save_exported
from .data.loader import open_splits
from .models.backbone import build_model, count_parameters, describe_weights
from .provenance import library_versions
from .data.tasks import Task, get_task
from .train import (REFERENCE_CONFIGS, TrainConfig, fit, load_trainable_state, make_model, pick_device, place,
                    predict_logits)

ALL_METHODS = ("direct", "full", "lora")
SEEDS = 3  # retrained per method by default
TOP_K = 3  # configs of each search retrained by default


@dataclass(frozen=True)
class Recipe:
    """What to retrain for one method, and where it came from."""

    method: str
    config: TrainConfig
    source: str  # the experiment folder, or "reference recipe"
    search_val: float | None  # the search's best val metric of the config
    rank: int = 1  # 1: the search's best config, k: its k-th best
    model: str = ""  # the backbone it trains (direct: tests): the config's own, else the retrain's

    @property
    def folder(self) -> str:
        """Its models' folder name before -seed<S>: the search's best keeps the plain method name."""
        return layout.run_folder(self.method, self.rank)


def latest_searches(results_dir: Path, names: list[str] | None = None) -> dict[str, Path]:
    """The newest finished search experiment (one with best.json) of each method, among `names` if given."""
    latest: dict[str, tuple[float, Path]] = {}
    for best in Path(results_dir).glob(f"*/{layout.BEST}"):
        if names is not None and best.parent.name not in names:
            continue
        record = json.loads(best.read_text())
        if not finished(record):
            continue
        method = record["method"]
        if method not in latest or best.stat().st_mtime > latest[method][0]:
            latest[method] = (best.stat().st_mtime, best.parent)
    return {method: folder for method, (_, folder) in latest.items()}


def finished(best: dict) -> bool:
    """Whether a best.json is a finished search's: a running or interrupted one keeps it up to date too."""
    return not best.get("running", False) and best.get("complete", True)


def read_best(experiment: Path) -> dict:
    best = Path(experiment) / layout.BEST
    if best.is_file() and finished(record := json.loads(best.read_text())):
        return record
    why = "it is not a search experiment" if not (Path(experiment) / layout.SEARCH_OPTIONS).is_file() else \
        "it has no finished trial (still running, interrupted or every trial failed)"
    raise GalaxyTuneError(f"--from {experiment}: {why}: pass a finished search experiment (resume an interrupted "
                          "one with `search ... --resume --name NAME`)")


def top_configs(experiment: Path, k: int, task: Task) -> list[tuple[TrainConfig, float]]:
    """The k best distinct configs of a finished search, ranked as best.json ranks them (best val metric); of each
    backbone when its space chose the backbone."""
    best = read_best(experiment)  # the retrain's data is its searches', so their task is the retrain's
    trials_path = Path(experiment) / layout.TRIALS
    if (k == 1 and not best["config"].get("model")) or not trials_path.is_file():
        return [(TrainConfig.from_dict(best["config"]), best[task.val_metric])]
    trials = pd.read_csv(trials_path)
    trials = trials[trials["status"].isin(["COMPLETED", "STOPPED"])]
    out, seen, per_backbone = [], set(), Counter()
    for _, trial in task.rank(trials).iterrows():
        config = TrainConfig.from_dict(json.loads(trial["config"]))
        key = json.dumps({name: v for name, v in config.to_dict().items() if name != "seed"}, sort_keys=True)
        if key not in seen and per_backbone[config.model] < k:
            seen.add(key)
            per_backbone[config.model] += 1
            out.append((config, float(trial[f"best_{task.val_metric}"])))
    return out


def recipes(experiments: dict[str, Path], methods: list[str], max_epochs: int | None, task: Task,
            top_k: int = 1, model_name: str = "") -> list[Recipe]:
    """The configs to retrain for each trained method (the top_k of its search, of each backbone it chose, else the
    reference recipe), each on its config's backbone or `model_name`."""
    out = []
    for method in methods:
        if method == "direct":
            continue
        if method in experiments:
            top = top_configs(experiments[method], top_k, task)
            ranked = [(config, str(experiments[method]), val) for config, val in top]
        else:
            ranked = [(REFERENCE_CONFIGS[method], "reference recipe", None)]
            print(f"{method}: no search found, retraining the reference recipe")
        for rank, (config, source, val) in enumerate(ranked, start=1):
            if max_epochs is not None:
                config = dataclasses.replace(config, epochs=min(config.epochs, max_epochs))
                config.validate()
            out.append(Recipe(method, config, source, val, rank, config.model or model_name))
    return out


def direct_recipes(plans: list[Recipe], model_name: str) -> list[Recipe]:
    """`direct` on `model_name` and on every other backbone the plans train, ranked in that order."""
    backbones = dict.fromkeys([model_name, *(r.model for r in plans)])
    return [Recipe("direct", None, "no training", None, rank, backbone)
            for rank, backbone in enumerate(backbones, start=1)]


def top_k_shortfalls(plans: list[Recipe], experiments: dict[str, Path], top_k: int) -> list[str]:
    """A line for each search that has fewer distinct finished configs than --top-k asks for."""
    found = Counter((r.method, r.config.model) for r in plans if r.method in experiments)
    return [f"{method}: --top-k {top_k}, but {experiments[method]} has {n} distinct finished config(s)"
            f"{f' of {backbone}' if backbone else ''}: {n} retrained"
            for (method, backbone), n in found.items() if 0 < n < top_k]


def run_retrain(prepared: Prepared, model_name: str, experiments: dict[str, Path], out_dir: Path,
                methods: list[str] | tuple[str, ...] = ALL_METHODS, seeds: int = SEEDS, max_epochs: int | None = None,
                device: str | None = None, augment: bool = True, top_k: int = TOP_K,
                resume: bool = False) -> pd.DataFrame:
    """Retrain and test every method's top configs with `seeds` seeds; writes test_results.csv (one row per
    method, config rank and seed, `selected` marking each method's val-chosen config), test_predictions.csv (per
    test image: label, logits, probability of class 1 without and with TTA, vote consensus; for kaggle-votes the
    squared errors and the 37 predicted fractions) and the models.

    Each finished run (a method's config and a seed) is kept in `runs/` as it ends. With `resume`, `out_dir` is
    a stopped retrain of the same plan (refused otherwise), and its finished runs are read back, not run again.
    """
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise GalaxyTuneError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(ALL_METHODS)}")
    if seeds < 1 or top_k < 1:
        raise GalaxyTuneError(f"--seeds {seeds} and --top-k {top_k} must be at least 1")
    device = pick_device(device)
    task = get_task(prepared.task)
    plans = recipes(experiments, methods, max_epochs, task, top_k, model_name)
    direct = direct_recipes(plans, model_name) if "direct" in methods else []
    plan = {"methods": list(methods), "seeds": seeds, "top_k": top_k, "model": model_name,
            "prepared": str(prepared.folder), "augment": augment,
            "recipes": {r.folder: {"source": r.source, "config": r.config.to_dict()} for r in plans},
            **({"direct": [r.model for r in direct]} if len(direct) > 1 else {})}
    claim_retrain(out_dir, plan, resume)
    splits = dict(zip(("train", "val", "test"), open_splits(prepared, "train", "val", "test")))
    notes = top_k_shortfalls(plans, experiments, top_k)
    for note in notes:
        print(note)
    head_bias = task.head_bias(splits["train"].labels)  # kaggle-votes: fresh heads start at the prior
    runs = out_dir / layout.RETRAIN_RUNS
    runs.mkdir(exist_ok=True)
    order = [(seed, recipe) for seed in range(seeds) for recipe in direct + plans]
    kept = {path.stem for path in runs.glob("*.json")}
    if kept:
        print(f"{len(kept)} of {len(order)} runs finished before: kept from {runs}")
    tested = []
    epochs = sum(r.config.epochs for seed, r in order if r.config and f"{r.folder}-seed{seed}" not in kept)
    progress = tqdm(total=epochs, desc="retrain", unit="epoch")
    hf_logging.disable_progress_bar()  # one bar: the models' "Writing model shards" would break ours
    try:
        for seed, recipe in order:
            run = f"{recipe.folder}-seed{seed}"
            if run not in kept:
                write_run(runs / run, *retrain_one(recipe, seed, prepared, splits, device, task, head_bias,
                                                   augment, out_dir / run, progress))
            tested.append(read_run(runs / run))  # read back, fresh or kept: both kinds reach the tables alike
    except KeyboardInterrupt:
        raise Stopped(f"the retrain stopped after {len(tested)} of {len(order)} runs, kept in {runs}: continue it "
                      f"with the same command and `--name {out_dir.name} --resume auto`") from None
    progress.close()
    results = pd.DataFrame([row for _, row in tested])
    results["selected"] = task.chosen_configs(results)
    results.to_csv(out_dir / layout.TEST_RESULTS, index=False)
    summary = data_summary(prepared)
    predictions = pd.concat([predictions for predictions, _ in tested])
    predictions.merge(consensus_of(Path(summary["data_dir"]), prepared.task), on="GalaxyID", how="left").to_csv(
        out_dir / layout.TEST_PREDICTIONS, index=False)
    selected = results[results["selected"]].drop_duplicates("method").set_index("method")["rank"]
    # The majority class's accuracy, or the constant predictor's RMSE, on the test split.
    baseline = task.baseline(splits["train"].labels, splits["test"].labels)
    (out_dir / layout.RETRAIN).write_text(json.dumps({
        "data": summary, "model": model_name, "seeds": seeds, "methods": list(methods),
        "top_k": top_k, "notes": notes, "selected_rank": {m: int(r) for m, r in selected.items()},
        "recipes": {r.folder: {"method": r.method, "rank": r.rank, "source": r.source, "config": r.config.to_dict(),
                               f"search_{task.val_metric}": r.search_val} for r in plans},
        "metric": task.metric, "mode": task.mode,
        f"baseline_test_{task.metric}": baseline, **({} if task.regression else {"majority_share": baseline}),
        "versions": library_versions()}, indent=2))
    return results


def claim_retrain(out_dir: Path, plan: dict, resume: bool) -> None:
    """Make the retrain's folder and write its plan, or (resume) check that the stopped retrain there had this plan."""
    saved = out_dir / layout.RETRAIN_PLAN
    if not resume:
        try:
            out_dir.mkdir(parents=True)
        except FileExistsError:
            raise GalaxyTuneError(f"{out_dir} exists: choose another --name, or add --resume auto to continue the "
                                  "retrain there") from None
        # The id tells this retrain from an earlier one of its name (its MLflow parent run's tag); not compared.
        layout.write_atomically(saved, json.dumps({**plan, "id": uuid.uuid4().hex}, indent=2))
        return
    if not saved.is_file():
        raise GalaxyTuneError(f"no retrain to resume at {out_dir} (it has no {layout.RETRAIN_PLAN}): check --name and "
                              "--results-dir")
    before = json.loads(saved.read_text())
    # A plan written before a hyperparameter existed names it with its default: the same config.
    before["recipes"] = {folder: {**recipe, "config": TrainConfig.from_dict(recipe["config"]).to_dict()}
                         for folder, recipe in before.get("recipes", {}).items()}
    for key, value in plan.items():
        if before.get(key) != value:
            what = {"recipes": "the configs retrained (a search has changed since: pass --from)",
                    "direct": "backbones for direct (a search has changed since: pass --from)",
                    "prepared": "the data (--data-dir and its settings)", "augment": "--no-augment"}.get(
                key, f"--{key.replace('_', '-')}")
            raise GalaxyTuneError(f"{out_dir} was started with other {what}: {before.get(key)} then, {value} now: "
                                  "run the command that started it, or choose another --name")


def retrain_one(recipe: Recipe, seed: int, prepared: Prepared, splits: dict, device, task: Task, head_bias,
                augment: bool, folder: Path, progress: tqdm) -> tuple[pd.DataFrame, dict]:
    """One run: train the recipe with this seed (none for direct), keep its best-val epoch, export it, test it."""
    if recipe.config is None:
        model = place(build_model(recipe.model, num_labels=len(prepared.class_names), seed=seed,
                                  head_bias=head_bias), device)
        return test_model(recipe, seed, model, splits, device, task, train_seconds=0.0, images_seen=0)
    config = dataclasses.replace(recipe.config, seed=seed, augment=augment and recipe.config.augment)
    model = make_model(config, recipe.model, num_labels=len(prepared.class_names), head_bias=head_bias)
    best: dict = {}

    def keep_best(metrics: dict, state) -> None:
        value = metrics[task.val_metric]
        progress.update()
        progress.set_postfix_str(f"{recipe.folder} seed {seed} epoch {metrics['epoch']}/{config.epochs} "
                                 f"{task.metric_label} {value:.3f}")
        if not best or task.better(value, best["value"]):
            best.update(value=value, epoch=metrics["epoch"], state=state(with_optimizer=False))

    started = time.perf_counter()
    history = fit(model, config, splits["train"], splits["val"], device, on_epoch=keep_best)
    seconds = time.perf_counter() - started
    load_trainable_state(model, config, best["state"]["model"])
    predictions, row = test_model(dataclasses.replace(recipe, config=config), seed, model, splits, device, task,
                                  train_seconds=seconds, images_seen=history[-1]["images_seen"],
                                  best_epoch=best["epoch"])
    save_exported(model, config.to_dict(), recipe.method, prepared, folder, temperature=row["temperature"])
    return predictions, row


def write_run(path: Path, predictions: pd.DataFrame, row: dict) -> None:
    """Keep a finished run: its predictions, then its test_results row, whose file marks the run finished."""
    predictions.to_csv(path.with_suffix(".csv"), index=False)
    layout.write_atomically(path.with_suffix(".json"), json.dumps(row, indent=2, default=lambda v: v.item()))


def read_run(path: Path) -> tuple[pd.DataFrame, dict]:
    return pd.read_csv(path.with_suffix(".csv")), json.loads(path.with_suffix(".json").read_text())


def consensus_of(data_dir: Path, task: str) -> pd.DataFrame:
    """GalaxyID and the winning answer's vote fraction for the task (empty if the data folder has moved)."""
    try:
        return read_consensus(data_dir, task).reset_index()
    except GalaxyTuneError:
        return pd.DataFrame({"GalaxyID": pd.Series(dtype=np.int64), "consensus": pd.Series(dtype=float)})


def test_model(recipe: Recipe, seed: int, model, splits, device, task: Task, train_seconds: float,
               images_seen: int, best_epoch: int = 0) -> tuple[pd.DataFrame, dict]:
    """One line of test_results.csv and the model's per-image test predictions (with and without TTA).

    A classifier's temperature is fitted on the val split's logits; its test logits are saved uncalibrated.
    """
    config = recipe.config
    trainable, total = count_parameters(model) if config is not None else (0, count_parameters(model)[1])
    val, test = splits["val"], splits["test"]
    val_logits = predict_logits(model, val, device)
    logits = {name: predict_logits(model, test, device, tta=tta) for name, tta in (("plain", False), ("tta", True))}
    metric = task.metric
    if task.regression:
        predicted = {name: task.predictions(v) for name, v in logits.items()}
        errors = {f"sq_error{suffix}": np.square(predicted[name] - test.labels).mean(1)
                  for name, suffix in (("plain", ""), ("tta", "_tta"))}
        predictions = pd.DataFrame({"GalaxyID": test.galaxy_ids, "method": recipe.method, "rank": recipe.rank,
                                    "seed": seed, **errors,
                                    **{f"pred_{c}": predicted["tta"][:, i] for i, c in enumerate(task.outputs)}})
        calibration = {"temperature": 1.0}
    else:
        temperature = fit_temperature(val_logits, val.labels)
        probs = {name: probabilities(v) for name, v in logits.items()}
        predictions = pd.DataFrame({"GalaxyID": test.galaxy_ids, "label": test.labels, "method": recipe.method,
                                    "rank": recipe.rank, "seed": seed,
                                    **{f"logit_{i}": logits["plain"][:, i] for i in range(logits["plain"].shape[1])},
                                    "prob_1": probs["plain"][:, 1], "prob_1_tta": probs["tta"][:, 1]})
        calibration = {"temperature": temperature, "val_nll": nll(val_logits, val.labels),
                       "val_nll_calibrated": nll(val_logits, val.labels, temperature)}
    return predictions, {
        "method": recipe.method, "rank": recipe.rank, "seed": seed,
        f"search_val_{metric}": recipe.search_val,
        f"val_{metric}": task.score(val_logits, val.labels),
        f"test_{metric}": task.score(logits["plain"], test.labels),
        f"test_{metric}_tta": task.score(logits["tta"], test.labels), **calibration,
        "trainable_params": trainable, "total_params": total, "epochs": config.epochs if config else 0,
        "best_epoch": best_epoch, "train_seconds": round(train_seconds, 1), "images_seen": images_seen,
        "model": recipe.model, "weights": describe_weights(recipe.model, seed), "source": recipe.source,
        "config": json.dumps(config.searched() if config else {})}
