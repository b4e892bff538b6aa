"""Reports rebuilt from what is on disk: the test-accuracy table of a retrain, beside the reference study."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

# Test accuracy (%) of the reference study (ResNet-50 pretrained on ImageNet, real Galaxy Zoo data).
REFERENCE_TEST_ACCURACY = {"direct": 68.94, "full": 88.52, "lora": 73.93}
METHOD_ORDER = ("direct", "full", "lora")


def accuracy_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per method: runs, val and test accuracy (mean ± sd over seeds, %), params, the reference."""
    rows = []
    for method in [m for m in METHOD_ORDER if m in set(results["method"])]:
        runs = results[results["method"] == method]
        test = runs["test_accuracy"] * 100
        rows.append({
            "method": method, "seeds": len(runs),
            "val acc %": f"{runs['val_accuracy'].mean() * 100:.2f}",
            "test acc %": f"{test.mean():.2f}" + (f" ± {test.std(ddof=1):.2f}" if len(runs) > 1 else ""),
            "reference test acc %": f"{REFERENCE_TEST_ACCURACY[method]:.2f}",
            "trainable params": f"{int(runs['trainable_params'].iloc[0]):,}",
            "epochs": int(runs["epochs"].iloc[0]),
            "train s": f"{runs['train_seconds'].mean():.0f}",
        })
    return pd.DataFrame(rows)


def write_retrain_report(folder: Path) -> Path:
    """report.md of a retrain folder (test_results.csv + retrain.json); returns its path."""
    folder = Path(folder)
    results = pd.read_csv(folder / "test_results.csv")
    info = json.loads((folder / "retrain.json").read_text())
    data = info["data"]
    table = accuracy_table(results)
    lines = [
        f"# galaxy_tune retrain: {folder.name}",
        "",
        f"Task `{data['task']}` ({' vs '.join(data['class_names'])}) on `{data['data_dir']}`, "
        f"{data['image_size_px']} px images (crop {data['crop_px'] or 'none'}), split seed {data['seed']}; "
        f"test split {sum(data['counts']['test'])} images.",
        f"Backbone: {results['weights'].iloc[0].rsplit(' (seed', 1)[0]} (`{info['model']}`).",
        f"Majority-class share of the test split: {info['majority_share'] * 100:.2f} % "
        "(what a model answering the larger class scores).",
        "",
        table.to_markdown(index=False),
        "",
        "Reference: the reference study's test accuracy with ImageNet-pretrained ResNet-50 on the real data.",
        "",
        "## Recipes",
    ]
    for method, recipe in info["recipes"].items():
        lines.append(f"- **{method}** from {recipe['source']}: `{json.dumps(recipe['config'])}`")
    lines += ["", f"Library versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path



def write_search_report(experiment: Path) -> Path:
    """report.md of a search experiment: the best config and the ranked trials."""
    experiment = Path(experiment)
    trials = pd.read_csv(experiment / "trials.csv")
    best = json.loads((experiment / "best.json").read_text())
    shown = [c for c in trials.columns if c not in ("config", "val_accuracy_curve", "path")]
    ranked = trials.sort_values("best_val_accuracy", ascending=False)[shown]
    lines = [
        f"# galaxy_tune search: {experiment.name}",
        "",
        f"Method `{best['method']}`, {len(trials)} trials "
        f"({', '.join(f'{n} {s.lower()}' for s, n in trials['status'].value_counts().items())}), "
        f"backbone {best['weights']}, task `{best['data']['task']}` at {best['data']['image_size_px']} px.",
        f"Best val accuracy {best['val_accuracy'] * 100:.2f} % (trial {best['trial_id']}, epoch {best['epoch']}) "
        f"with `{json.dumps(best['config'])}`.",
        "",
        ranked.to_markdown(index=False, floatfmt=".4g"),
        "",
    ]
    path = experiment / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_report(folder: Path) -> Path:
    """Rebuild the report of a search experiment or a retrain folder."""
    if (Path(folder) / "retrain.json").is_file():
        return write_retrain_report(folder)
    return write_search_report(folder)
