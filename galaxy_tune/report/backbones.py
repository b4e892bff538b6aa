"""A retrain's backbones, when there are several: one row per backbone and method.

It answers which backbone, and full fine-tuning or LoRA. Test numbers stand beside the val numbers that chose."""

from __future__ import annotations

import pandas as pd

from .figure import METHOD_ORDER, Metric
from .stats import mean_and_sd


def backbones(results: pd.DataFrame) -> list[str]:
    """The backbones of a retrain's runs, in order of first appearance (one for a retrain of one backbone)."""
    return list(dict.fromkeys(results["model"])) if "model" in results else []


def short_name(model: str) -> str:
    """`hf_hub:mwalmsley/zoobot-encoder-convnext_nano` -> `zoobot-encoder-convnext_nano`; `timm:x` -> `x`."""
    return model.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]


def backbone_section(all_results: pd.DataFrame, metric: Metric) -> list[str]:
    """The section, or nothing when every run used one backbone."""
    if len(backbones(all_results)) < 2:
        return []
    short, digits = ("acc %" if metric.percent else metric.task.metric_name), metric.digits
    test = f"test_{metric.task.metric}"
    groups = ["model", "method"]
    configs = all_results.groupby(groups)["rank"].nunique()
    rows = []
    for (model, method), chosen in all_results[metric.task.chosen_configs(all_results, by=tuple(groups))].groupby(
            groups, sort=False):
        rows.append({"backbone": model, "method": method, "configs": configs[model, method],
                     "trainable params": f"{int(chosen['trainable_params'].iloc[0]):,}",
                     f"val {short}": mean_and_sd(metric.shown(chosen[metric.name]), digits),
                     f"test {short}": mean_and_sd(metric.shown(chosen[test]), digits),
                     "reported": "✓" if chosen["selected"].any() else "", "_order": METHOD_ORDER.index(method)})
    table = pd.DataFrame(rows).sort_values(["_order", "backbone"], kind="stable").drop(columns="_order")
    better = "best" if metric.task.mode == "max" else "lowest"
    return ["## Backbones", "",
            (f"One row per backbone and method: of each, the retrained config with the {better} mean val "
             f"{metric.task.metric_name} over seeds (mean ± sd). Each method reports (✓) its {better} on val over "
             "every backbone; no test number took part."),
            "", table.to_markdown(index=False, disable_numparse=True), ""]
