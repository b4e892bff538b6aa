"""The training loop: it learns, it is deterministic on the CPU, and a resumed run matches an uninterrupted one."""

import dataclasses
import io
import math

import pytest
import torch
from torch.cuda._utils import _get_device_index

from galaxy_tune.data.loader import open_split
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.models.backbone import count_parameters
from galaxy_tune.train import TrainConfig, fit, make_model, pick_device, training_precision

CPU = torch.device("cpu")
QUICK = TrainConfig(method="full", lr=3e-3, optimizer="adam", scheduler="constant", epochs=4, batch_size=16)


def run(prepared, config, **kwargs):
    model = make_model(config, "tiny")
    return model, fit(model, config, open_split(prepared, "train"), open_split(prepared, "val"), CPU, **kwargs)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_reduces_the_loss_on_demo_data(prepared, method):
    config = dataclasses.replace(QUICK, method=method, lr=1e-2 if method == "lora" else 3e-3, epochs=5)
    model, history = run(prepared, config)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)  # what oneDNN runs fastest
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(0 <= h["val_accuracy"] <= 1 for h in history)


def test_training_is_deterministic_given_the_seed(prepared):
    _, a = run(prepared, QUICK)
    _, b = run(prepared, QUICK)
    _, c = run(prepared, dataclasses.replace(QUICK, seed=1))
    drop_time = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert drop_time(a) == drop_time(b)
    assert drop_time(a) != drop_time(c)


@pytest.mark.parametrize("method, scheduler", [("full", "onecycle"), ("lora", "step")])
def test_resuming_from_a_checkpoint_matches_an_uninterrupted_run(prepared, method, scheduler):
    config = dataclasses.replace(QUICK, method=method, scheduler=scheduler, step_size=1, epochs=3)
    saved = {}
    _, whole = run(prepared, config, on_epoch=lambda m, state: saved.setdefault(m["epoch"], state()))
    # Round-trip the checkpoint through bytes the way the trainable does, with weights-only loading.
    buffer = io.BytesIO()
    torch.save(saved[1], buffer)
    buffer.seek(0)
    _, resumed = run(prepared, config, start=torch.load(buffer, weights_only=True))
    assert [h["epoch"] for h in resumed] == [2, 3]
    for a, b in zip(whole[1:], resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_accuracy"] == b["val_accuracy"]


def test_lora_trains_a_fraction_of_the_parameters(prepared):
    full, _ = count_parameters(make_model(QUICK, "tiny"))
    lora, total = count_parameters(make_model(dataclasses.replace(QUICK, method="lora", lora_rank=2), "tiny"))
    assert lora < full / 3 and total > full


@pytest.mark.parametrize("values, culprit", [
    ({"learning_rate": 0.1}, "unknown hyperparameter"),
    ({"optimizer": "lion"}, "optimizer='lion' is not one of"),
    ({"lr": -1}, "lr=-1.0 must be positive"),
    ({"epochs": "many"}, "epochs='many' must be a int"),
])
def test_bad_hyperparameters_are_refused(values, culprit):
    with pytest.raises(GalaxyTuneError, match=culprit):
        TrainConfig.from_dict(values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_on_the_gpu_in_bf16_channels_last(prepared, method):
    config = dataclasses.replace(QUICK, method=method, lr=1e-2 if method == "lora" else 3e-3, epochs=5)
    model = make_model(config, "tiny")
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []  # (input is channels_last, output dtype) of every forward of the first convolution
    first_conv.register_forward_hook(lambda module, inputs, output: seen.append(
        (inputs[0].is_contiguous(memory_format=torch.channels_last), output.dtype)))
    history = fit(model, config, open_split(prepared, "train"), open_split(prepared, "val"), pick_device("cuda"))
    assert next(model.parameters()).is_cuda and len(history) == 5
    assert seen and all(seen_channels_last for seen_channels_last, _ in seen)  # batches arrive channels_last
    bf16 = training_precision(pick_device("cuda")) == "bf16"  # Ampere or later: autocast runs every forward in bf16
    assert {dtype for _, dtype in seen} == {torch.bfloat16 if bf16 else torch.float32}
    losses = [h["train_loss"] for h in history]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("cuda_visible", [False, True])
def test_every_command_picks_cuda_when_torch_sees_a_gpu_unless_told_cpu(monkeypatch, cuda_visible):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_visible)  # what torch sees, simulated
    assert pick_device().type == pick_device("auto").type == ("cuda" if cuda_visible else "cpu")
    assert pick_device("cpu").type == "cpu"
    if cuda_visible:
        # With its index: torch's own check, which set_per_process_memory_fraction runs, refuses a bare "cuda".
        assert _get_device_index(pick_device("cuda")) == _get_device_index(pick_device()) == 0
    else:
        with pytest.raises(GalaxyTuneError, match="a GPU was asked for but torch sees none: use --device cpu"):
            pick_device("cuda")
    with pytest.raises(GalaxyTuneError, match="--device 'gpu' is unknown"):
        pick_device("gpu")


def test_the_same_seed_gives_the_same_lora_initialisation():
    config = dataclasses.replace(QUICK, method="lora", seed=3)
    first = make_model(config, "tiny")
    torch.rand(1000)  # whatever ran before (another trial in a reused worker) must not matter
    again = make_model(config, "tiny")
    other = make_model(dataclasses.replace(config, seed=4), "tiny")
    lora_a = lambda model: [p for n, p in model.named_parameters() if "lora_A" in n]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(lora_a(first), lora_a(again), strict=True))
    assert not torch.equal(lora_a(first)[0], lora_a(other)[0])
