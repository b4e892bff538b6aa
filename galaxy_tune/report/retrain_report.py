"""The report of a retrain folder: the methods compared honestly on the test split.

Spread and confidence intervals over seeds and over test images, test accuracy with and without TTA, the top-k
selection on val and the winner's curse, McNemar's test and a paired bootstrap of full fine-tuning vs LoRA on the
same test images, the evaluation a Galaxy Zoo referee expects (`evaluation`: accuracy by vote consensus,
calibration, selective prediction, the cost-accuracy frontier), confusion matrices and the galaxies each method
gets wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image

from .. import layout
from ..data.prepare import load_prepared
from ..data.pixels import image_path
from ..errors import GalaxyTuneError
from ..data.kaggle import IMAGE_SIZE_PX
from ..data.tasks import get_task
from .backbones import backbone_section, backbones
from .evaluation import evaluation_sections, full_vs_lora, selection_section
from .figure import METHOD_COLORS, METHOD_ORDER, FigureSkipped, Metric, class_label, embed, percent_axis
from .runs import predicted_class, seed_predictions, selected_runs
from .stats import fmt_interval, mean_and_sd, t_interval, wilson_interval
from .votes_report import votes_sections

GALLERY_PER_METHOD = 6


def write_retrain_report(folder: Path, out_dir: Path | None = None) -> Path:
    """report.md and figures of a retrain folder (in out_dir, default the folder); returns report.md."""
    folder = Path(folder)
    out = Path(out_dir or folder)
    out.mkdir(parents=True, exist_ok=True)
    all_results, all_predictions = (pd.read_csv(folder / name) for name in (layout.TEST_RESULTS,
                                                                            layout.TEST_PREDICTIONS))
    results, predictions = selected_runs(all_results, all_predictions)
    info = json.loads((folder / layout.RETRAIN).read_text())
    data = info["data"]
    seeds = sorted(set(results["seed"]))
    test_images = sum(data["counts"]["test"])
    metric = Metric(get_task(data["task"]))
    votes = metric.task.regression  # kaggle-votes: the 37 fractions, scored by RMSE
    lines = [
        f"# galaxy_tune retrain: {folder.name}",
        "",
        (f"Task `{data['task']}` ({'37 vote fractions' if votes else ' vs '.join(data['class_names'])}) on "
         f"`{data['data_dir']}`, {data['image_size_px']} px images (crop {data['crop_px'] or 'none'}), split seed "
         f"{data['seed']}; test split {test_images} images. Each method was retrained with {len(seeds)} seed(s)."),
        backbone_line(all_results, info),
        *(f"Note: {note}." for note in info.get("notes", [])),
    ]
    if votes:
        lines += [*votes_sections(out, results, predictions, info),
                  *backbone_section(all_results, metric), *selection_section(out, all_results, metric),
                  *cost_section(results)]
    else:
        lines += classification_sections(out, results, predictions, all_results, all_predictions, info, metric)
    lines += ["## Recipes", ""]
    for method, recipe in info["recipes"].items():  # a config's "model": "" trains the retrain's backbone
        config = {**recipe["config"], "model": recipe["config"].get("model") or info["model"]}
        lines.append(f"- **{method}** from {recipe['source']}: `{json.dumps(config)}`")
    lines += ["", f"Library versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.", ""]
    path = out / layout.REPORT
    path.write_text("\n".join(lines))
    return path


def classification_sections(out: Path, results: pd.DataFrame, predictions: pd.DataFrame,
                            all_results: pd.DataFrame, all_predictions: pd.DataFrame, info: dict,
                            metric: Metric) -> list[str]:
    """The report.md lines of a binary task's retrain (after the common heading)."""
    data = info["data"]
    seeds = sorted(set(results["seed"]))
    test_images = sum(data["counts"]["test"])
    reference = dict(metric.task.reference)  # the study's task only
    return [
        (f"Majority-class share of the test split: {info['majority_share'] * 100:.2f} % "
         "(what a model answering the larger class scores)."),
        "",
        "## Test accuracy",
        "",
        accuracy_table(results, predictions, reference).to_markdown(index=False),
        "",
        ("- *mean ± sd*: over the seeds. *95 % CI over seeds*: Student-t interval of the mean test accuracy over "
         "seeds (training randomness)" + ("; it needs ≥ 2 seeds: rerun `retrain --seeds 3`." if len(seeds) < 2
                                         else ".")),
        (f"- *95 % CI over test images*: Wilson interval of the seed-{seeds[0]} model's test accuracy over the "
         f"{test_images} test images (how far another test split of this size could move it)."),
        "- *with TTA*: logits averaged over the 8 flips and 90° rotations of each test image.",
        ("- *reference*: the reference study's test accuracy with ImageNet-pretrained ResNet-50 on the real data."
         if reference else "- No reference column: the reference study ran the `seed-top2` task only."),
        "",
        *embed(out, "test_accuracy.png", "Test accuracy per method: bars are the mean over seeds, whiskers ±1 sd, "
               "dots single seeds; black bars mark the reference study, the dotted line the majority class",
               lambda: plot_test_accuracy(results, info["majority_share"], reference)),
        *backbone_section(all_results, metric),
        *selection_section(out, all_results, metric),
        "## Full fine-tuning vs LoRA",
        "",
        *full_vs_lora(predictions),
        *evaluation_sections(out, all_results, all_predictions, info),
        *cost_section(results),
        "## Errors",
        "",
        *embed(out, "confusion_matrices.png", f"Confusion matrices on the test split (seed {seeds[0]}): counts "
               "and share of each true class", lambda: plot_confusion_matrices(predictions, data["class_names"])),
        *embed(out, "misclassified.png", f"Test galaxies each method gets wrong (seed {seeds[0]}, most confident "
               "mistakes first), as the model sees them before resizing",
               lambda: plot_misclassified(predictions, data)),
    ]


def backbone_line(all_results: pd.DataFrame, info: dict) -> str:
    """The backbone the runs started from, or the backbones when a search chose among them."""
    models = backbones(all_results)
    if len(models) > 1:
        return f"Backbones: {', '.join(f'`{m}`' for m in models)}."
    return f"Backbone: {base_weights(all_results['weights'].iloc[0])} (`{info['model']}`)."


def base_weights(weights: str) -> str:
    """`random init tiny resnet (seed 0)` without the seed: what the backbone started from."""
    return weights.rsplit(" (seed", 1)[0]


def accuracy_table(results: pd.DataFrame, predictions: pd.DataFrame,
                   reference: dict[str, float]) -> pd.DataFrame:
    """One row per method: test accuracy (mean ± sd, CI over seeds, CI over images, with TTA), val, reference."""
    rows = []
    for method in [m for m in METHOD_ORDER if m in set(results["method"])]:
        runs = results[results["method"] == method].sort_values("seed")
        test, tta = runs["test_accuracy"] * 100, runs["test_accuracy_tta"] * 100
        first = seed_predictions(predictions, method, int(runs["seed"].iloc[0]))
        correct = int((predicted_class(first["prob_1"]) == first["label"].to_numpy()).sum())
        rows.append({
            "method": method, "seeds": len(runs),
            "test acc %": mean_and_sd(test),
            "95 % CI over seeds": fmt_interval(t_interval(runs["test_accuracy"])),
            f"seed {int(runs['seed'].iloc[0])} test acc % [95 % CI over test images]":
                f"{correct / len(first) * 100:.2f} {fmt_interval(wilson_interval(correct, len(first)))}",
            "test acc % with TTA": mean_and_sd(tta),
            "val acc %": f"{runs['val_accuracy'].mean() * 100:.2f}",
            **({"reference test acc %": f"{reference[method]:.2f}"} if reference else {}),
        })
    return pd.DataFrame(rows)


def cost_section(results: pd.DataFrame) -> list[str]:
    return ["## Cost and provenance", "", cost_table(results).to_markdown(index=False), ""]


def cost_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method: what training it took and what it started from."""
    rows = []
    for method in [m for m in METHOD_ORDER if m in set(results["method"])]:
        runs = results[results["method"] == method]
        rows.append({
            "method": method,
            "trainable params": f"{int(runs['trainable_params'].iloc[0]):,}",
            "total params": f"{int(runs['total_params'].iloc[0]):,}",
            "epochs (best epoch per seed)": "no training" if method == "direct" else
                f"{int(runs['epochs'].iloc[0])} ({', '.join(str(int(e)) for e in runs['best_epoch'])})",
            "train s per seed": f"{runs['train_seconds'].mean():.1f}",
            "images seen per seed": f"{int(runs['images_seen'].iloc[0]):,}",
            "backbone weights": base_weights(runs["weights"].iloc[0]),
            "recipe": runs["source"].iloc[0],
        })
    return pd.DataFrame(rows)


def plot_test_accuracy(results: pd.DataFrame, majority: float,
                       reference: dict[str, float]) -> Figure:
    """Bars of mean test accuracy per method, without and with TTA; sd whiskers, seed dots, reference marks."""
    methods = [m for m in METHOD_ORDER if m in set(results["method"])]
    seeds = results["seed"].nunique()
    figure = Figure(figsize=(8, 5.4), layout="constrained")
    ax = figure.subplots()
    width, top = 0.36, 100.0
    for i, method in enumerate(methods):
        runs = results[results["method"] == method]
        for offset, column, hatch, alpha in ((-width / 2, "test_accuracy", None, 1.0),
                                             (width / 2, "test_accuracy_tta", "//", 0.55)):
            values = runs[column].to_numpy() * 100
            sd = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.bar(i + offset, values.mean(), width, yerr=sd if len(values) > 1 else None, capsize=5,
                   color=METHOD_COLORS[method], alpha=alpha, hatch=hatch, edgecolor="black", linewidth=0.6)
            ax.text(i + offset, 2, f"{values.mean():.1f}", ha="center", va="bottom", fontsize=10,
                    fontweight="bold", bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.85,
                                                 "linewidth": 0})
            ax.scatter(np.full(len(values), i + offset), values, color="black", s=12, zorder=4)
            top = max(top, values.mean() + sd)
        if reference:
            ax.hlines(reference[method], i - width, i + width, color="black", linewidth=3, zorder=5)
            ax.text(i + width, reference[method], f" {reference[method]:.1f}", va="center", fontsize=9)
    ax.axhline(majority * 100, color="black", linestyle=":", linewidth=1.2)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.6, len(methods) - 0.35)
    ax.set_xlabel("method")
    percent_axis(ax, "test accuracy (%)", 0, top + 4)
    ax.set_yticks(range(0, 101, 20))
    figure.legend(handles=[
        Patch(facecolor="white", edgecolor="black", label="plain"),
        Patch(facecolor="white", edgecolor="black", hatch="//", label="with TTA (8 views)"),
        Line2D([], [], color="black", marker="o", linestyle="", markersize=4, label="single seed"),
        *([Line2D([], [], color="black", linewidth=3, label="reference study (ResNet-50, real data)")]
          if reference else []),
        Line2D([], [], color="black", linestyle=":", label=f"majority class ({majority * 100:.1f} %)"),
    ], loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    ax.set_title(f"Test accuracy per method (mean ± sd over {seeds} seeds)" if seeds > 1 else
                 "Test accuracy per method (1 seed: retrain --seeds 3 for error bars)")
    return figure


def plot_confusion_matrices(predictions: pd.DataFrame, class_names: list[str]) -> Figure:
    """One confusion matrix per method on the test split (first seed), counts and share of each true class."""
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix  # here: a search's report needs no sklearn

    methods = [m for m in METHOD_ORDER if m in set(predictions["method"])]
    seed = int(predictions["seed"].min())
    figure = Figure(figsize=(4.3 * len(methods), 4.4), layout="constrained")
    axes = figure.subplots(1, len(methods), squeeze=False)[0]
    labels = [class_label(name) for name in class_names]
    for ax, method in zip(axes, methods):
        picked = seed_predictions(predictions, method, seed)
        truth, guess = picked["label"].to_numpy(), predicted_class(picked["prob_1"])
        counts = confusion_matrix(truth, guess, labels=range(len(class_names)))
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        # Coloured by the share of each true class, so panels compare even though the classes differ in size.
        display = ConfusionMatrixDisplay(shares, display_labels=labels)
        display.plot(ax=ax, cmap="Blues", colorbar=False, im_kw={"vmin": 0, "vmax": 1})
        for (i, j), text in np.ndenumerate(display.text_):
            text.set_text(f"{counts[i, j]}\n{shares[i, j] * 100:.0f} %")
            text.set_fontsize(12)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{method}: {(truth == guess).mean() * 100:.1f} % correct", color=METHOD_COLORS[method],
                     fontweight="bold")
    figure.suptitle(f"Confusion matrices on the test split ({len(picked)} images, seed {seed}): "
                    "count and share of each true class")
    return figure


def galaxy_pictures(data: dict, galaxy_ids: list[int]) -> dict[int, np.ndarray]:
    """RGB pixels of test galaxies: the centre crop of the original JPEG (what the model sees before resizing),
    else the prepared pixel cache (what it sees after)."""
    from ..data.loader import open_split  # torch: only when the gallery falls back to the pixel cache

    crop = data["crop_px"] or IMAGE_SIZE_PX
    low, high = (IMAGE_SIZE_PX - crop) // 2, (IMAGE_SIZE_PX + crop) // 2
    pictures, missing = {}, []
    for galaxy_id in galaxy_ids:
        path = image_path(Path(data["data_dir"]), galaxy_id)
        try:
            with Image.open(path) as image:
                pictures[galaxy_id] = np.asarray(image.convert("RGB").crop((low, low, high, high)))
        except OSError:
            missing.append(galaxy_id)
    if missing:
        try:
            test = open_split(load_prepared(Path(data["prepared"]), data["image_size_px"], data["crop_px"]), "test")
        except (GalaxyTuneError, OSError):
            return pictures
        rows = dict(zip(test.galaxy_ids.tolist(), test.rows.tolist()))
        pictures.update({i: np.asarray(test.pixels[rows[i]]).transpose(1, 2, 0) for i in missing if i in rows})
    return pictures


def plot_misclassified(predictions: pd.DataFrame, data: dict) -> Figure:
    """A row of test galaxies per method that it gets wrong, each titled with its true and predicted class."""
    methods = [m for m in METHOD_ORDER if m in set(predictions["method"])]
    seed = int(predictions["seed"].min())
    class_names = data["class_names"]
    wrong, total_wrong = {}, {}
    for method in methods:
        picked = seed_predictions(predictions, method, seed)
        picked["guess"] = predicted_class(picked["prob_1"])
        picked["confidence"] = np.where(picked["guess"] == 1, picked["prob_1"], 1 - picked["prob_1"])
        mistakes = picked[picked["guess"] != picked["label"]]
        total_wrong[method] = len(mistakes)
        wrong[method] = mistakes.sort_values("confidence", ascending=False).head(GALLERY_PER_METHOD)
    pictures = galaxy_pictures(data, sorted({int(i) for m in wrong.values() for i in m["GalaxyID"]}))
    if not pictures and any(len(m) for m in wrong.values()):
        raise FigureSkipped(f"neither the JPEGs in {data['data_dir']} nor the pixel cache in {data['prepared']} "
                            "are there any more")
    figure = Figure(figsize=(1.9 * GALLERY_PER_METHOD + 0.6, 2.35 * len(methods) + 0.4), layout="constrained")
    axes = figure.subplots(len(methods), GALLERY_PER_METHOD, squeeze=False)
    for row, method in zip(axes, methods):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
        row[0].set_ylabel(f"{method}\n{total_wrong[method]} wrong", fontsize=12, fontweight="bold",
                          color=METHOD_COLORS[method])
        if wrong[method].empty:
            row[0].text(0.05, 0.5, "no test errors", transform=row[0].transAxes, fontsize=11)
        for ax, mistake in zip(row, wrong[method].itertuples()):
            picture = pictures.get(int(mistake.GalaxyID))
            if picture is not None:
                ax.imshow(picture, interpolation="nearest" if picture.shape[0] < 100 else "antialiased")
            ax.set_title(f"{mistake.GalaxyID}\ntrue: {class_label(class_names[mistake.label], short=True)}\n"
                         f"said: {class_label(class_names[mistake.guess], short=True)} "
                         f"({mistake.confidence * 100:.0f} %)", fontsize=8.5)
    figure.suptitle(f"Test galaxies each method gets wrong (seed {seed}; most confident mistakes first)")
    return figure
