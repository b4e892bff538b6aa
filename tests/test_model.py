import torch

import huggingface_hub
import pytest

from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.models.backbone import (
    DEFAULT_MODEL,
    RANDOM_RESNET50,
    TINY,
    build_model,
    count_parameters,
    describe_weights,
    load_backbone,
)


def _same_weights(a, b) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_tiny_model_classifies_images_into_two_classes():
    model = build_model(TINY)
    logits = model(torch.randn(8, 3, 32, 32)).logits
    assert logits.shape == (8, 2)


def test_random_weights_depend_only_on_seed():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    assert _same_weights(build_model(TINY, seed=0), build_model(TINY, seed=0))
    assert not _same_weights(build_model(TINY, seed=0), build_model(TINY, seed=1))
    assert torch.equal(torch.rand(1), before), "building a model must not disturb the global RNG"


def test_count_parameters_splits_trainable_from_total():
    model = build_model(TINY)
    trainable, total = count_parameters(model)
    assert trainable == total > 0
    model.resnet.requires_grad_(False)
    trainable, total_after = count_parameters(model)
    assert total_after == total
    assert trainable == sum(p.numel() for p in model.classifier.parameters())


def test_random_resnet50_has_resnet50_size_with_two_class_head():
    trainable, total = count_parameters(build_model(RANDOM_RESNET50))
    assert trainable == total
    assert abs(total - 23.5e6) < 0.1e6


def test_local_folder_loads_like_pretrained_weights(tmp_path):
    saved = build_model(TINY, seed=3)
    saved.save_pretrained(tmp_path)
    loaded = build_model(str(tmp_path))
    assert _same_weights(saved, loaded)
    assert describe_weights(str(tmp_path), seed=0) == f"pretrained {tmp_path}"


@pytest.mark.parametrize("name", ["missing-folder", "galaxy-tune-tests/no-such-model"])
def test_explicit_model_that_cannot_load_raises(tmp_path, name):
    if name == "missing-folder":
        name = str(tmp_path / name)
    with pytest.raises(GalaxyTuneError, match="no-such-model|missing-folder"):
        load_backbone(name)


def test_default_backbone_falls_back_to_random_resnet50_when_offline(monkeypatch, tmp_path, capsys):
    # Offline with an empty Hugging Face cache, whatever this machine's network and cache: the fallback must run.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model, name = load_backbone(None, seed=3)
    err = capsys.readouterr().err
    assert name == RANDOM_RESNET50
    assert err.count("warning:") == 1 and "falling back" in err and DEFAULT_MODEL in err
    assert _same_weights(model, build_model(RANDOM_RESNET50, seed=3))  # the random-init ResNet-50 of that seed
    assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 2)
    # Another Hub id is not replaced: the error says where to put a copy (as --model, or among a space's choices).
    with pytest.raises(GalaxyTuneError, match=r"offline and not in the Hugging Face cache\); run once with network "
                       r"access to cache them, name a local folder with a copy \(save_pretrained output\) in its "
                       r"place, or use resnet50-random$"):
        build_model("microsoft/resnet-18")


def test_describe_weights_names_the_provenance():
    assert describe_weights(DEFAULT_MODEL, seed=0) == "pretrained microsoft/resnet-50"
    assert describe_weights(RANDOM_RESNET50, seed=4) == "random init resnet-50 (seed 4)"
    assert describe_weights(TINY, seed=0) == "random init tiny resnet (seed 0)"
