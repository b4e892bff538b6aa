"""The training loop: it learns, it is deterministic on the CPU, and a resumed run matches an uninterrupted one."""

import dataclasses

import pytest
import torch

from galaxy_tune.data import open_split
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.model import count_parameters
from galaxy_tune.train import TrainConfig, fit, make_model

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
    # Round-trip the checkpoint through disk the way the trainable does, with weights-only loading.
    path = torch.save(saved[1], buffer := __import__("io").BytesIO()) or buffer
    path.seek(0)
    _, resumed = run(prepared, config, start=torch.load(path, weights_only=True))
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
    from galaxy_tune.train import pick_device

    config = dataclasses.replace(QUICK, method=method, epochs=2)
    model = make_model(config, "tiny")
    history = fit(model, config, open_split(prepared, "train"), open_split(prepared, "val"), pick_device(1))
    assert next(model.parameters()).is_cuda and len(history) == 2
    assert history[-1]["train_loss"] == history[-1]["train_loss"]  # finite, not NaN


def test_asking_for_a_gpu_where_there_is_none_is_refused():
    from galaxy_tune.train import pick_device

    if torch.cuda.is_available():
        assert pick_device(1).type == "cuda"
    else:
        with pytest.raises(GalaxyTuneError, match="torch sees none"):
            pick_device(1)
