"""What a task asks of the vote table, and everything that follows from it: targets, outputs, loss, metric.

Two kinds of task:
- **Classification** (`seed-top2`, the reference study's, and `smooth-featured`): a binary label per kept galaxy,
  cross-entropy, scored by accuracy (higher is better), the majority class as the baseline.
- **Vote regression** (`kaggle-votes`, the Kaggle challenge's own task): all 37 vote fractions of every galaxy,
  scored by the competition's metric, the RMSE over all 37 outputs of all galaxies (lower is better), the
  training set's mean fractions as the baseline (the constant predictor).

The 37 outputs respect the decision tree by construction (`per_question_softmax`): the logits of each question's
answers go through a softmax, scaled by the fraction that reached the question, its parent answer
(`kaggle.PARENT_ANSWER`). Class1's and Class6's answers sum to 1 (everyone is asked), Class2's to Class1.2, Class7's
to Class1.1, and so on; questions are computed in order, so every parent is ready before its children. The loss is
the mean squared error of those outputs, the square of the metric (as the winning solution trained).

This module imports no torch at import time (`data` and the reports use it); the loss and the output mapping import
it when called.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import GalaxyTuneError
from .kaggle import ANSWERS_PER_QUESTION, CLASS_COLUMNS, PARENT_ANSWER, question_columns

TREE_TOLERANCE = 1e-3  # the real rows obey the decision tree to about 1e-6 (fractions rounded to 6 digits)


@dataclass(frozen=True)
class Task:
    """A task: its outputs (class names or the 37 columns), metric and direction, and what each needs."""

    name: str
    outputs: tuple[str, ...]
    metric: str  # "accuracy" or "rmse": reported as val_<metric> and test_<metric>
    mode: str  # "max" or "min": the better direction of the metric
    # The reference study's test accuracy (%) per method (ResNet-50 pretrained on ImageNet, real data), if it ran
    # this task: the comparison column of the retrain report.
    reference: tuple[tuple[str, float], ...] = ()
    confident: bool = False  # keeps only galaxies with at least --min-vote for their answer (then part of the split)
    fixed: tuple[tuple[str, object], ...] = ()  # hyperparameters that mean nothing for the task: not searched

    @property
    def val_metric(self) -> str:
        return f"val_{self.metric}"

    @property
    def direction(self) -> str:
        """Optuna's name for the mode."""
        return "maximize" if self.mode == "max" else "minimize"

    @property
    def regression(self) -> bool:
        return self.metric == "rmse"

    @property
    def metric_name(self) -> str:
        """The metric as tables, reports and figures write it."""
        return "RMSE" if self.regression else "accuracy"

    @property
    def metric_label(self) -> str:
        return f"val {self.metric_name}"

    def arg_best(self, values) -> int:
        """The position of the best of some metric values (NaN never wins)."""
        values = np.asarray(values, dtype=float)
        return int(np.nanargmax(values) if self.mode == "max" else np.nanargmin(values))

    def better(self, a: float, b: float) -> bool:
        """Whether `a` is strictly better than `b`."""
        return a > b if self.mode == "max" else a < b

    def rank(self, trials: pd.DataFrame) -> pd.DataFrame:
        """trials.csv rows best first: by best_<val metric> in the task's direction, then by epochs run."""
        return trials.sort_values([f"best_{self.val_metric}", "epochs"], ascending=[self.mode == "min", False],
                                  kind="stable")

    def chosen_configs(self, results: pd.DataFrame, by: tuple[str, ...] = ("method",)) -> np.ndarray:
        """A retrain's reported config of each `by` group: the rank with the best mean val metric over seeds (ties:
        the search's better one). Test numbers play no part. Returns a bool per row of `results`."""
        mean_val = results.groupby([*by, "rank"])[self.val_metric].mean().reset_index()
        chosen = mean_val.sort_values([self.val_metric, "rank"], ascending=[self.mode == "min", True]).drop_duplicates(
            list(by))
        return results.set_index([*by, "rank"]).index.isin(chosen.set_index([*by, "rank"]).index)


@dataclass(frozen=True)
class Classification(Task):
    """Binary: label 1 for `outputs[1]`, 0 for `outputs[0]`, for the galaxies whose deciding answer (the arg-max
    over `among`) is one of them, with at least `--min-vote` of the votes when `confident`."""

    among: tuple[str, ...] = tuple(CLASS_COLUMNS)

    def targets(self, votes: pd.DataFrame, min_vote: float) -> pd.DataFrame:
        """The label of each galaxy the task keeps, indexed by GalaxyID."""
        negative, positive = self.outputs
        answers = votes[list(self.among)]
        # idxmax takes the first of equal columns, as numpy argmax does: Class1.2 beats its Class2.x ties.
        winner = answers.idxmax(axis=1)
        if self.confident:
            winner = winner.where(answers.max(axis=1) >= min_vote)
        kept = winner[winner.isin([negative, positive])]
        return (kept == positive).astype(np.int64).rename("label").to_frame()

    def strata(self, targets: pd.DataFrame) -> np.ndarray:
        return targets["label"].to_numpy()

    def vote_problems(self, votes: pd.DataFrame) -> list[str]:
        """What in the vote table deserves a warning: nothing, as a binary label needs no more than an arg-max."""
        return []

    def labels(self, manifest: pd.DataFrame) -> np.ndarray:
        """The training targets of a split manifest's rows: (N,) int labels."""
        return manifest["label"].to_numpy()

    @property
    def strata_names(self) -> tuple[str, ...]:
        return self.outputs

    def consensus(self, votes: pd.DataFrame) -> pd.Series:
        """How decisive the volunteers were: the vote fraction of the answer that decided the label."""
        return votes[list(self.among)].max(axis=1).rename("consensus")

    def loss(self, logits, targets, label_smoothing: float = 0.0):
        from torch.nn import functional

        return functional.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    def score(self, logits: np.ndarray, targets: np.ndarray) -> float:
        return float((logits.argmax(1) == targets).mean())

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities: the softmax of the logits, as the retrain's test predictions compute them."""
        from scipy.special import softmax

        return softmax(logits, axis=1)

    def head_bias(self, train: np.ndarray) -> np.ndarray | None:
        """A fresh head's bias: None keeps the model's own (zero)."""
        return None

    def baseline(self, train: np.ndarray, test: np.ndarray) -> float:
        """Accuracy of always answering the training split's larger class."""
        return float((test == np.bincount(train, minlength=2).argmax()).mean())


@dataclass(frozen=True)
class VoteRegression(Task):
    """The 37 vote fractions, consistent with the decision tree (see the module's docstring)."""

    def targets(self, votes: pd.DataFrame, min_vote: float) -> pd.DataFrame:
        return votes[CLASS_COLUMNS].clip(0.0, 1.0).astype(np.float32)

    def strata(self, targets: pd.DataFrame) -> np.ndarray:
        """The split is stratified by each galaxy's Q1 answer (smooth, features/disk, star/artifact)."""
        return targets[question_columns(1)].to_numpy().argmax(1)

    def vote_problems(self, votes: pd.DataFrame) -> list[str]:
        """One line on the rows that break the decision tree (the outputs obey it, so they cannot fit those rows):
        their count and the worst of them."""
        reached = {q: pd.Series(1.0, index=votes.index) if parent is None else votes[parent]
                   for q, parent in PARENT_ANSWER.items()}
        sums = pd.DataFrame({q: votes[question_columns(q)].sum(axis=1) for q in PARENT_ANSWER})
        errors = (sums - pd.DataFrame(reached)).abs()
        broken = int((errors.max(axis=1) > TREE_TOLERANCE).sum())
        if not broken:
            return []
        galaxy, question = errors.stack().idxmax()
        parent = PARENT_ANSWER[question]
        expected = "1" if parent is None else f"{parent}'s {reached[question][galaxy]:.6g}"
        return [f"{broken} of {len(votes)} rows break the decision tree: a question's answers must sum to the "
                f"fraction that reached it (within {TREE_TOLERANCE:g}). The worst is GalaxyID {galaxy}: its "
                f"Class{question} answers sum to {sums[question][galaxy]:.6g}, not {expected}. kaggle-votes trains "
                "on these rows as they are: check the CSV"]

    def labels(self, manifest: pd.DataFrame) -> np.ndarray:
        """(N, 37) float32 vote fractions."""
        return manifest[CLASS_COLUMNS].to_numpy(np.float32)

    @property
    def strata_names(self) -> tuple[str, ...]:
        return tuple(question_columns(1))

    def consensus(self, votes: pd.DataFrame) -> pd.Series:
        return votes[question_columns(1)].max(axis=1).rename("consensus")

    def loss(self, logits, targets, label_smoothing: float = 0.0):
        """Mean squared error of the tree-consistent outputs (label smoothing has no meaning here)."""
        return (per_question_softmax(logits) - targets).square().mean()

    def score(self, logits: np.ndarray, targets: np.ndarray) -> float:
        """The competition's RMSE over all outputs of all galaxies."""
        return rmse(self.predictions(logits), targets)

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """The 37 vote fractions."""
        import torch

        return per_question_softmax(torch.from_numpy(logits).double()).numpy()

    def head_bias(self, train: np.ndarray) -> np.ndarray:
        """The bias whose outputs are the training split's mean fractions (the constant predictor): the log of each
        answer's share of its question, so a fresh head starts at the prior instead of at uniform answers."""
        mean = np.clip(train.astype(np.float64).mean(0), 1e-6, None)
        column = {name: i for i, name in enumerate(CLASS_COLUMNS)}
        shares = [mean[[column[c] for c in question_columns(q)]] / (1.0 if parent is None else mean[column[parent]])
                  for q, parent in PARENT_ANSWER.items()]
        return np.log(np.concatenate([s / s.sum() for s in shares]))

    def baseline(self, train: np.ndarray, test: np.ndarray) -> float:
        """RMSE of the constant predictor: every test galaxy gets the training split's mean fractions."""
        return rmse(np.broadcast_to(train.mean(0), test.shape), test)


def rmse(predicted: np.ndarray, targets: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(predicted, np.float64) - targets))))


def per_question_softmax(logits):
    """(N, 37) logits -> (N, 37) vote fractions: a softmax over each question's answers, times its parent's
    fraction, in CSV column order. Works on torch tensors (differentiable)."""
    import torch

    blocks = torch.split(logits, list(ANSWERS_PER_QUESTION.values()), dim=1)  # questions 1-11 in CSV order
    out: list[torch.Tensor] = []
    for parent, block in zip(_PARENT_PLACES, blocks):
        shares = torch.softmax(block, dim=1)
        if parent is not None:  # answer A of question Q, computed earlier
            asked, answer = parent
            shares = shares * out[asked][:, answer:answer + 1]
        out.append(shares)
    return torch.cat(out, dim=1)


# Each question's parent answer "ClassQ.A" as (Q - 1, A - 1): where per_question_softmax finds it; None: asked of all.
_PARENT_PLACES = [None if parent is None else tuple(int(part) - 1 for part in parent.removeprefix("Class").split("."))
                  for parent in PARENT_ANSWER.values()]


TASKS: dict[str, Task] = {task.name: task for task in (
    # The reference study's: the arg-max of all 37 answers is Class6.2 (nothing odd, 0) or Class1.2 (features, 1).
    Classification("seed-top2", ("Class6.2", "Class1.2"), "accuracy", "max",
                   reference=(("direct", 68.94), ("full", 88.52), ("lora", 73.93))),
    # Q1 smooth (0) vs features or disk (1), with a confident vote (--min-vote).
    Classification("smooth-featured", ("Class1.1", "Class1.2"), "accuracy", "max",
                   among=tuple(question_columns(1)), confident=True),
    # The Kaggle challenge's: all 37 vote fractions, tree-consistent, scored by RMSE.
    VoteRegression("kaggle-votes", tuple(CLASS_COLUMNS), "rmse", "min", fixed=(("label_smoothing", 0.0),)),
)}


DEFAULT_TASK = "seed-top2"


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise GalaxyTuneError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]
