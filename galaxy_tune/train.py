"""The one training loop, shared by search trials and the retrain: config in, per-epoch metrics out.

`fit` knows nothing of Ray: callers pass `on_epoch(metrics, state)` to report or checkpoint, and `start` (a
state saved earlier) to resume. Batches are seeded by (seed, epoch), so a resumed run sees the same data as an
uninterrupted one and the epoch number is all the random state a checkpoint needs beyond the weights.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from .data.loader import ImageSplit, batches, empty_batch, orient
from .errors import GalaxyTuneError
from .models.lora import add_lora, adapter_state_dict, is_legacy_adapter_state, load_adapter_state
from .models.backbone import build_model, freeze_stages, normalisation, param_groups
from .data.tasks import DEFAULT_TASK, Task, get_task
# The config and its choices live without torch (the search's driver needs them alone); they are the training's too.
from .train_config import DEVICES, METHODS, OPTIMIZERS, REFERENCE_CONFIGS, SCHEDULERS, TrainConfig  # noqa: F401


def pick_device(request: str | None = "auto") -> torch.device:
    """The device every command runs on: a GPU when torch sees one ("auto"), or the one asked for."""
    request = request or "auto"
    if request not in DEVICES:
        raise GalaxyTuneError(f"--device {request!r} is unknown: choose one of {', '.join(DEVICES)}")
    if request == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return use_gpu(0)  # the first GPU torch sees (CUDA_VISIBLE_DEVICES chooses which)
    if request == "cuda":
        raise GalaxyTuneError("a GPU was asked for but torch sees none: use --device cpu (or 0 GPUs), or check "
                              "the CUDA driver and that torch is a CUDA build")
    return torch.device("cpu")


def use_gpu(index: int, memory_share: float = 1.0) -> torch.device:
    """GPU `index` as a device with its index, set up to train: cuDNN autotuning on, and this process capped at
    `memory_share` of the GPU's memory, so trials sharing a GPU can't run each other out of it.

    The index matters: `torch.cuda.set_per_process_memory_fraction` refuses a bare "cuda".
    """
    device = torch.device("cuda", index)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
    if memory_share < 1:
        torch.cuda.set_per_process_memory_fraction(memory_share, device)
    return device


def make_model(config: TrainConfig, model_name: str, num_labels: int = 2,
               head_bias: np.ndarray | None = None) -> nn.Module:
    """The backbone (the config's own, else `model_name`) with a fresh head (its bias `head_bias`, the task's prior,
    if given), wrapped with LoRA adapters when the method asks for them."""
    model = build_model(config.model or model_name, num_labels=num_labels, seed=config.seed, head_bias=head_bias)
    if config.method == "full":
        freeze_stages(model, config.frozen_stages)
    if config.method == "lora":
        with torch.random.fork_rng(devices=[]):  # the adapters' init depends on the seed alone
            torch.default_generator.manual_seed(config.seed)
            add_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, config.lora_batchnorm,
                     scaling=config.lora_scaling, stages=config.stages())
    return model


def trainable_state(model: nn.Module, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights a result needs on top of the base model: all of them, or adapters + head + BatchNorm."""
    if config.method == "lora":
        return adapter_state_dict(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_trainable_state(model: nn.Module, config: TrainConfig, state: dict[str, torch.Tensor]) -> None:
    if config.method == "lora":
        load_adapter_state(model, state)
    else:
        model.load_state_dict(state)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over `model.param_groups`: layer-wise lr, frozen stages, LoRA+, no decay on biases/norms."""
    groups = param_groups(model, config.lr, config.weight_decay, config.lr_decay, config.lora_plus_ratio)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=config.lr)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A scheduler stepped once per batch, so every kind sees the same clock."""
    total = config.epochs * steps_per_epoch
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size * steps_per_epoch,
                                               gamma=config.gamma)
    if config.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device` with channels_last conv weights, so convolutions run channels_last.

    cuDNN and oneDNN (CPU) both run ResNet convolutions fastest that way: ResNet-50 evaluates ~1.4x faster on
    the CPU. The batches stay NCHW; the first convolution reorders its 3-channel input.
    """
    return model.to(device, memory_format=torch.channels_last)


@functools.cache
def training_precision(device: torch.device) -> str:
    """"bf16" (autocast) on a GPU that computes bf16 natively, of compute capability 8 (Ampere) or later; "fp32"
    on older GPUs, which emulate bf16 slowly (a warning says so), and on the CPU, where training is deterministic."""
    if device.type != "cuda":
        return "fp32"
    capability = torch.cuda.get_device_capability(device)
    if capability[0] >= 8:
        return "bf16"
    warnings.warn(f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) has "
                  "no native bf16: galaxy_tune trains and predicts in fp32 on it")
    return "fp32"


def autocast(device: torch.device):
    """bf16 mixed precision where `training_precision` says so; full precision elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=training_precision(device) == "bf16")


@torch.no_grad()
def predict_logits(model: nn.Module, split: ImageSplit, device: torch.device, batch_size: int = 64,
                   tta: bool = False) -> np.ndarray:
    """(N, outputs) float logits of a split, in the split's order, in eval mode.

    With `tta`, the logits are averaged over the 8 flips/rotations of each image (galaxies have no orientation):
    the views of batch_size / 8 images go through one forward of batch_size, channels_last. The logits stay on
    the device until the split is done, so the CPU never waits for the GPU between batches.
    """
    model.eval()
    views = 8 if tta else 1
    out = []
    for x, _ in batches(split, max(1, batch_size // views), device, reuse=True, normalisation=normalisation(model)):
        if tta:
            turned = empty_batch((views * len(x), *x.shape[1:]), device)
            for element, part in enumerate(turned.split(len(x))):
                part.copy_(orient(x, element))
            x = turned
        with autocast(device):
            logits = model(pixel_values=x).logits.float()
        out.append(logits.view(views, -1, logits.shape[1]).mean(0))
    if not out:
        return np.zeros((0, model.config.num_labels), dtype=np.float32)
    return torch.cat(out).cpu().numpy()


def evaluate(model: nn.Module, split: ImageSplit, device: torch.device, batch_size: int = 64) -> dict[str, float]:
    """Loss and the task's metric (accuracy, or RMSE) of the model on a split."""
    task = get_task(split.task)
    logits = predict_logits(model, split, device, batch_size)
    loss = task.loss(torch.from_numpy(logits), torch.from_numpy(split.labels)).item()
    return {"loss": loss, task.metric: task.score(logits, split.labels)}


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                  label_smoothing: float = 0.0, task: Task = get_task(DEFAULT_TASK)) -> torch.Tensor:
    """The task's loss of a batch as training computes it: the forward in `training_precision`, the loss in fp32."""
    with autocast(device):
        return task.loss(model(pixel_values=x).logits.float(), y, label_smoothing)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               device: torch.device, label_smoothing: float = 0.0, task: Task = get_task(DEFAULT_TASK)) -> torch.Tensor:
    """One optimisation step on a batch with the task's loss (`training_loss`); returns the loss."""
    loss = training_loss(model, x, y, device, label_smoothing, task)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, device: torch.device,
                stream: Iterable[tuple[torch.Tensor, torch.Tensor]], label_smoothing: float = 0.0,
                task: Task = get_task(DEFAULT_TASK)) -> tuple[torch.Tensor, int]:
    """Train on every batch of `stream`, stepping the scheduler per batch: fit's epoch, and what `bench` times.

    Returns the summed loss, still on the device (no sync per step), and the number of images.
    """
    model.train()
    loss_sum, seen = torch.zeros((), device=device), 0
    for x, y in stream:
        loss = train_step(model, optimizer, x, y, device, label_smoothing, task)
        scheduler.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
    return loss_sum, seen


EpochCallback = Callable[[dict, Callable[[], dict]], None]


def fit(model: nn.Module, config: TrainConfig, train: ImageSplit, val: ImageSplit, device: torch.device, *,
        start: dict | None = None, on_epoch: EpochCallback | None = None) -> list[dict]:
    """Train `model` for `config.epochs` on the splits' task, evaluating on `val` after each epoch; returns the
    per-epoch metrics (val_loss and val_<metric>: val_accuracy, or val_rmse).

    `on_epoch(metrics, state)` is called after every epoch; `state()` returns the checkpoint (weights,
    optimizer, scheduler, epoch) that `start` accepts to resume after that epoch.
    """
    place(model, device)
    optimizer = make_optimizer(config, model)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = make_scheduler(config, optimizer, steps_per_epoch)
    first_epoch = 1
    if start is not None:
        if config.method == "lora" and is_legacy_adapter_state(start["model"]):
            raise GalaxyTuneError("this checkpoint was written by the earlier loralib ConvLoRA layer, whose adapters "
                                  "have other shapes: its training can't continue; start a new search (the "
                                  "finished trials' results stay where they are)")
        load_trainable_state(model, config, start["model"])
        optimizer.load_state_dict(start["optimizer"])
        scheduler.load_state_dict(start["scheduler"])
        first_epoch = start["epoch"] + 1

    def state(epoch: int, with_optimizer: bool = True) -> dict:
        if not with_optimizer:  # the weights alone, e.g. to keep the best epoch's model
            return {"model": trainable_state(model, config), "epoch": epoch}
        # Copies, not views: the optimizer keeps updating its state tensors in place after this epoch.
        return {"model": trainable_state(model, config), "optimizer": copy.deepcopy(optimizer.state_dict()),
                "scheduler": scheduler.state_dict(), "epoch": epoch}

    history = []
    for epoch in range(first_epoch, config.epochs + 1):
        started = time.perf_counter()
        loss_sum, seen = train_steps(model, optimizer, scheduler, device, batches(
            train, config.batch_size, device, shuffle=True, augment=config.augment,
            seed=config.seed * 100_003 + epoch, reuse=True, normalisation=normalisation(model)), config.label_smoothing,
            get_task(train.task))
        total_loss = loss_sum.item()  # the epoch's one wait for the device
        if not math.isfinite(total_loss):
            raise GalaxyTuneError(f"training diverged at epoch {epoch} (loss {total_loss}): lower lr={config.lr}")
        val_metrics = evaluate(model, val, device)
        metrics = {"epoch": epoch, "train_loss": total_loss / max(seen, 1), "val_loss": val_metrics["loss"],
                   **{f"val_{k}": v for k, v in val_metrics.items() if k != "loss"},
                   "lr": optimizer.param_groups[0]["lr"],
                   "epoch_seconds": time.perf_counter() - started, "images_seen": seen * epoch}
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, functools.partial(state, epoch))
    return history
