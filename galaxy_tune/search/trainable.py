"""The Ray Tune trainable: a thin adapter from Ray's `config` dict to `train.fit`.

Each epoch is reported with `tune.report`. A checkpoint (weights or adapters + head, optimizer, scheduler,
epoch) goes with the report once `checkpoint_every_s` has passed since the trial's last one, and with its
last epoch: writing ResNet-50 and its AdamW state takes about a second, a tenth of a short epoch, while
a crash then costs at most that interval plus an epoch. A trial restarted by Ray continues from
`tune.get_checkpoint()`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import ray
from ray import tune

from ..data.prepare import load_prepared
from ..errors import GalaxyTuneError
from ..storage import Storage
from ..data.tasks import get_task
from ..train_config import TrainConfig
from .cluster import trial_device
from .faults import StopMark

STATE_FILE = "state.pt"


def load_prepared_on_this_node(folder: Path, image_size_px: int, crop_px: int | None,
                               shared: tuple[Storage, str] | None = None):
    """The prepared data: this node's copy of what the driver shared through the object storage (`--storage`), or
    the folder the driver wrote, or one line saying this node can't see it and what to do."""
    if shared is not None:
        storage, name = shared
        return load_prepared(storage.fetch_prepared(name, ray.util.get_node_ip_address()), image_size_px, crop_px)
    if not folder.is_dir():
        raise GalaxyTuneError(f"node {ray.util.get_node_ip_address()} cannot see the prepared data {folder}: "
                              "trials read it from --results-dir, so every node of the cluster must mount "
                              "--results-dir (and --data-dir) at the same path, e.g. on NFS, or the search needs "
                              "--storage URI (object storage)")
    return load_prepared(folder, image_size_px, crop_px)


def train_trial(config: dict, *, prepared_dir: str, image_size_px: int, crop_px: int | None, model_name: str,
                cpus: float, gpus: float, checkpoint_every_s: float = 0.0, stop_marker: StopMark | None = None,
                fail_at_epoch: int | None = None, shared: tuple[Storage, str] | None = None) -> None:
    """Train one trial's config, reporting val metrics every epoch and checkpoints as the module says.

    While `stop_marker` is set (the search is stopping) every epoch checkpoints. `fail_at_epoch` makes
    the first attempt crash in that epoch, before its report (fault-injection tests). `shared`: the prepared data
    in the object storage, which this node downloads once.
    """
    # Here, not above: the driver, which hands this function to Ray, never trains.
    import torch

    from ..data.loader import open_splits
    from ..models.backbone import count_parameters
    from ..train import fit, make_model, training_precision, use_gpu

    train_config = TrainConfig.from_dict(config)
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # one line per checkpoint is noise
    torch.set_num_threads(max(1, int(cpus)))
    prepared = load_prepared_on_this_node(Path(prepared_dir), image_size_px, crop_px, shared)
    device, memory_share = trial_device(gpus)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GalaxyTuneError(
                f"node {ray.util.get_node_ip_address()} gave this trial {device} (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')}, {memory_share:.0%} of its memory) but torch there sees no "
                "GPU: check `nvidia-smi` on that node and that its torch is a CUDA build")
        use_gpu(device.index, memory_share)
    # Reported with every epoch: the driver may have no GPU, or another one.
    where = {"device": str(device), "precision": training_precision(device), "prepared": str(prepared.folder), **(
        {"gpu_name": torch.cuda.get_device_name(device), "gpu_memory_share": memory_share}
        if device.type == "cuda" else {})}
    train, val = open_splits(prepared, "train", "val")
    model = make_model(train_config, model_name, num_labels=len(prepared.class_names),
                       head_bias=get_task(prepared.task).head_bias(train.labels))
    trainable_params, total_params = count_parameters(model)

    start = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = torch.load(Path(folder) / STATE_FILE, weights_only=True, map_location="cpu")

    last_checkpoint = time.monotonic()

    def report(metrics: dict, state) -> None:
        nonlocal last_checkpoint
        if metrics["epoch"] == fail_at_epoch:
            marker = Path(tune.get_context().get_trial_dir()) / "injected_failure"
            if not marker.exists():  # the first attempt only
                marker.touch()
                raise RuntimeError(f"injected failure in epoch {fail_at_epoch}")
        metrics = {**metrics, "trainable_params": trainable_params, "total_params": total_params,
                   "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), **where}
        if (metrics["epoch"] < train_config.epochs and time.monotonic() - last_checkpoint < checkpoint_every_s
                and not (stop_marker and stop_marker.is_set())):
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state(), Path(folder) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        last_checkpoint = time.monotonic()

    fit(model, train_config, train, val, device,
        start=start, on_epoch=report)
