"""With `--storage`, the driver's live views go to the object storage beside Ray's experiment as they change:
trials.csv and best.json each time a trial finishes, optuna.db every STUDY_EVERY_S. Each request is tried once: a
storage that stops answering holds the driver for one request's timeout, not for pyarrow's retries (which waited
99 s for a silent endpoint). The first upload that fails is said, and the views wait RETRY_AFTER_S before the next
try. The search goes on, and its end uploads every view again, with retries."""

from __future__ import annotations

import time
from pathlib import Path

from ray import tune

from .. import layout
from ..storage import Storage

STUDY_EVERY_S = 60.0
RETRY_AFTER_S = 60.0
TABLES = [layout.TRIALS, layout.BEST]


class UploadViews(tune.Callback):
    """Upload the experiment's views after the watchers (`monitor.watchers`) wrote them."""

    def __init__(self, storage: Storage, experiment: Path):
        self.storage, self.experiment = storage.trying_once(), Path(experiment)
        self.study_sent, self.retry_at = 0.0, 0.0  # retry_at: when to try again after a failed upload (0: none)

    def __getstate__(self):  # Ray pickles the callbacks with the Tuner; a resumed driver has its own
        return {**self.__dict__, "study_sent": 0.0, "retry_at": 0.0}

    def __setstate__(self, state):  # pickle remakes an S3 filesystem with pyarrow's default retries
        self.__dict__.update(state)
        self.storage = self.storage.trying_once()

    def send(self, names: list[str]) -> None:
        if time.time() < self.retry_at:
            return
        if not self.storage.upload_views(self.experiment, names, say=not self.retry_at):
            self.retry_at = time.time() + RETRY_AFTER_S

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.send(TABLES)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.send(TABLES)

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.study_sent >= STUDY_EVERY_S:
            self.study_sent = time.time()
            self.send([layout.STUDY])
