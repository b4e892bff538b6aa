"""Reports rebuilt from what is on disk: report.md and PNG figures of a search experiment or a retrain folder.

A search report shows how every trial learned, how fast the search found its best config, which
hyperparameters mattered (Optuna's importances) and where their good values lie. A retrain report compares
the methods honestly on the test split: spread and confidence intervals over seeds and over test images, test
accuracy with and without TTA, the top-k selection on val and the winner's curse, McNemar's test and a paired
bootstrap of full fine-tuning vs LoRA on the same test images, accuracy by volunteer vote consensus, calibration
before and after temperature scaling, selective prediction, the cost-accuracy frontier, confusion matrices and
the galaxies each method gets wrong. Figures use matplotlib's object API (no pyplot),
so writing a report never touches the backend of a notebook that imports this module.

The package reads the results layout (`galaxy_tune.layout`) only: it imports neither the search (Ray) nor
torch, and Optuna only when a study is read.
"""

from __future__ import annotations

from pathlib import Path

from .. import layout
from ..errors import GalaxyTuneError
from .retrain_report import write_retrain_report
from .search_report import write_search_report

__all__ = ["write_report", "write_retrain_report", "write_search_report"]


def write_report(folder: Path, out_dir: Path | None = None) -> Path:
    """Rebuild the report of a search experiment or a retrain folder; returns its report.md."""
    folder = Path(folder)
    if (folder / layout.RETRAIN).is_file():
        missing = [n for n in (layout.TEST_RESULTS, layout.TEST_PREDICTIONS) if not (folder / n).is_file()]
        if missing:
            raise GalaxyTuneError(f"{folder} lacks {', '.join(missing)} (an interrupted or older retrain): "
                                  "rerun `python -m galaxy_tune retrain`")
        return write_retrain_report(folder, out_dir)
    if (folder / layout.TRIALS).is_file() and (folder / layout.BEST).is_file():
        return write_search_report(folder, out_dir)
    raise GalaxyTuneError(f"{folder} is neither a finished search experiment (trials.csv, best.json) nor a "
                          "retrain folder (retrain.json): pass one of those")
