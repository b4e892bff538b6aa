"""What every report figure shares: saving a figure into report.md (or saying why it is left out), axes and labels.

Figures use matplotlib's object API (no pyplot), so writing a report never touches the backend of a notebook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..data.tasks import Task, get_task

METHOD_ORDER = ("direct", "full", "lora")
METHOD_COLORS = {"direct": "#8c8c8c", "full": "#1f77b4", "lora": "#ff7f0e"}
# What the Galaxy Zoo answers of the tasks mean, for axis labels.
CLASS_MEANINGS = {"Class1.1": "smooth", "Class1.2": "features or disk", "Class6.2": "nothing odd"}
DPI = 110


class FigureSkipped(Exception):
    """A figure the data cannot support; the message says why, and the report says so instead."""


def embed(out: Path, name: str, caption: str, draw: Callable[[], Figure]) -> list[str]:
    """Markdown lines of one figure: draw it and save it as out/name, or say why it was left out."""
    path = out / name
    try:
        figure = draw()
    except FigureSkipped as why:
        path.unlink(missing_ok=True)  # never leave an earlier report's figure beside a report that omits it
        return [f"*{caption}: not drawn: {why}.*", ""]
    figure.savefig(path, dpi=DPI)
    return [f"![{path.stem.replace('_', ' ')}]({name})", "", f"*{caption}.*", ""]


def percent_axis(ax, label: str, low: float = 0, high: float = 100) -> None:
    ax.set_ylabel(label)
    ax.set_ylim(low, high)
    ax.grid(axis="y", alpha=0.3)


def class_label(name: str, short: bool = False) -> str:
    """`Class1.2 (features or disk)`, or just the meaning when `short`."""
    meaning = CLASS_MEANINGS.get(name)
    if meaning is None:
        return name
    return meaning if short else f"{name}\n({meaning})"


def padded_limits(values_percent: list[float]) -> tuple[float, float]:
    """y limits (%) showing every value with a margin, within 0-100."""
    low, high = min(values_percent), max(values_percent)
    margin = max(2.0, (high - low) * 0.08)
    return max(0.0, low - margin), min(102.0, high + margin)  # 102: a 100 % point stays whole


@dataclass(frozen=True)
class Metric:
    """How a report shows a task's val metric: accuracy in % (higher is better), or RMSE as it is (lower is)."""

    task: Task

    @classmethod
    def of(cls, best: dict) -> "Metric":
        """The metric a search (its best.json) was ranked by: its task's."""
        return cls(get_task(best["data"]["task"]))

    @property
    def name(self) -> str:  # the report key: val_accuracy or val_rmse
        return self.task.val_metric

    @property
    def percent(self) -> bool:
        return not self.task.regression

    @property
    def title(self) -> str:
        return f"validation {self.task.metric_name}"

    @property
    def unit(self) -> str:
        """An axis label's suffix."""
        return "(%)" if self.percent else "(lower is better)"

    @property
    def label(self) -> str:
        return f"{self.title} {self.unit}"

    @property
    def digits(self) -> int:
        """Decimals of a shown value: 2 of a %, 4 of an RMSE."""
        return 2 if self.percent else 4

    def shown(self, values) -> np.ndarray:
        return np.asarray(values, dtype=float) * (100 if self.percent else 1)

    def fmt(self, value: float) -> str:
        """A metric value (0-1 for accuracy) as the reports write it: 68.94 %, or 0.1234."""
        return f"{self.shown(value):.{self.digits}f}" + (" %" if self.percent else "")

    def so_far(self, values: np.ndarray) -> np.ndarray:
        """The best so far at each position (NaN: nothing yet)."""
        values = np.asarray(values, dtype=float)
        if self.task.mode == "max":
            return np.fmax.accumulate(np.nan_to_num(values, nan=-np.inf))
        return np.fmin.accumulate(np.nan_to_num(values, nan=np.inf))

    def axis(self, ax, values, label: str | None = None) -> None:
        """The y axis of shown values (labelled `label`, default `self.label`): 0-100 % padded around them, or a
        padded RMSE range."""
        label = label or self.label
        if self.percent:
            percent_axis(ax, label, *padded_limits(list(values)))
            return
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        margin = max((high - low) * 0.08, 0.005)
        ax.set_ylabel(label)
        ax.set_ylim(max(0.0, low - margin), high + margin)
        ax.grid(axis="y", alpha=0.3)
