"""timm backbones (Zoobot's encoders are timm models) on timm's tiny test architectures with random weights: loading
from a folder in timm's Hub layout, LoRA's guarantees, and every method through retrain, export and predict."""

import json

import huggingface_hub
import optuna
import pandas as pd
import pytest
import timm
import torch
from timm.models import save_for_hf
from torch import nn

from conftest import CROP_PX, IMAGE_SIZE_PX, randomise_batchnorm
from galaxy_tune.cli import main
from galaxy_tune.data.kaggle import IMAGES_DIR
from galaxy_tune.errors import GalaxyTuneError
from galaxy_tune.models.backbone import build_model, normalisation
from galaxy_tune.models.export import load_exported
from galaxy_tune.models.lora import LoraBranch, LoraConv2d, LoraLinear, add_lora, set_lora_sum, to_plain_model
from galaxy_tune.models.lora_layers import FoldedBatchNorm2d, FoldingLoraConv2d
from galaxy_tune.models.timm_backbone import TimmClassifier

TIMM_TINY = ["timm:test_resnet", "timm:test_convnext"]
IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1] * 4)


def trained_lora(name: str) -> nn.Module:
    """A LoRA model of a timm test architecture after a few SGD steps (B moves off zero)."""
    model = add_lora(build_model(name, seed=0), rank=4, alpha=8).train()
    with torch.no_grad():  # timm starts a ResNet block's last BatchNorm at 0 and a ConvNeXt block's scale at 1e-6:
        for n, parameter in model.named_parameters():  # the adapters before them would get no gradient
            if n.endswith((".gamma", "bn2.weight", "bn3.weight")):
                parameter.fill_(1.0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(pixel_values=IMAGES).logits, LABELS).backward()
        optimizer.step()
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=IMAGES).logits


def test_a_folder_in_timms_hub_layout_loads_with_the_weights_and_normalisation_written(tmp_path):
    written = timm.create_model("test_resnet", num_classes=0)
    written.pretrained_cfg = {**written.pretrained_cfg, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    save_for_hf(written, str(tmp_path), safe_serialization=True)
    model = build_model(str(tmp_path), num_labels=3, seed=1)
    assert isinstance(model, TimmClassifier)
    loaded = model.encoder.state_dict()
    assert loaded.keys() == written.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in written.state_dict().items())
    assert normalisation(model) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert model(pixel_values=IMAGES).logits.shape == (8, 3)


def test_timm_backbones_that_cannot_be_had_say_why_and_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(GalaxyTuneError, match="timm has no architecture 'no_such_net'"):
        build_model("timm:no_such_net")
    with pytest.raises(GalaxyTuneError, match="a stem and 4 stages .* choose one of those"):
        build_model("timm:test_vit")
    with pytest.raises(GalaxyTuneError, match="takes 160 px images only, and galaxy_tune feeds a backbone the "
                       "search's --image-size"):
        build_model("timm:test_maxvit")
    # Offline with an empty Hugging Face cache: the recipe to copy the model in.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(GalaxyTuneError, match=r"offline and not in the Hugging Face cache\): where there is network, "
                       r"run `hf download mwalmsley/zoobot-encoder-resnet50 --local-dir zoobot-encoder-resnet50`, copy "
                       r"the folder here and name it in place of hf_hub:mwalmsley/zoobot-encoder-resnet50$"):
        # as --model, or among a space's model choices
        build_model("hf_hub:mwalmsley/zoobot-encoder-resnet50")


@pytest.mark.parametrize("name, layers", [("timm:test_resnet", 9), ("timm:test_convnext", 18)])
def test_lora_on_a_timm_backbone_folds_exactly_and_leaves_the_frozen_base_without_gradients(name, layers, tmp_path):
    model = trained_lora(name)
    assert sum(isinstance(m, LoraBranch) for m in model.modules()) == layers  # ResNet convs, ConvNeXt MLP Linears
    assert all(m.lora_B.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, LoraBranch))
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model.train()(pixel_values=IMAGES).logits, LABELS).backward()
    with_gradient = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_gradient == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".base_layer." in n for n in with_gradient)
    assert all(("lora_" in n) or n.startswith("classifier.") or ".bn" in n or "downsample.2" in n
               for n in with_gradient)  # adapters, the head and BatchNorm ("stats": none of its affine params)
    plain = to_plain_model(model)
    assert not any(isinstance(m, LoraBranch) for m in plain.modules())
    torch.testing.assert_close(logits(plain), logits(model.train(False)), atol=1e-5, rtol=1e-5)


def test_a_timm_resnets_frozen_batchnorms_fold_into_their_lora_convs_and_train_as_unfolded(monkeypatch):
    torch.manual_seed(0)
    model = add_lora(build_model("timm:test_resnet", seed=0), rank=4, alpha=8, targets="all",
                     batchnorm="frozen").train()
    randomise_batchnorm(model)
    for m in model.modules():
        if isinstance(m, LoraConv2d):
            nn.init.normal_(m.lora_B.weight, std=0.1)
    # Every BatchNorm right after a LoRA convolution: the stem's behind its deep stem's Sequential stays.
    assert {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
            and not isinstance(m, FoldedBatchNorm2d)} == {"encoder.bn1"}
    trainable = [p for p in model.parameters() if p.requires_grad]

    def logits_and_gradients():
        out = model(pixel_values=IMAGES).logits
        return out.detach(), torch.autograd.grad(nn.functional.cross_entropy(out, LABELS), trainable)

    folded = logits_and_gradients()
    monkeypatch.setattr(FoldingLoraConv2d, "forward", LoraConv2d.forward)  # convolution, then BatchNorm
    monkeypatch.setattr(FoldedBatchNorm2d, "forward", nn.BatchNorm2d.forward)
    unfolded = logits_and_gradients()
    torch.testing.assert_close(folded, unfolded, rtol=1e-4, atol=1e-5)
    monkeypatch.undo()
    assert model.state_dict().keys() == add_lora(build_model("timm:test_resnet", seed=0), rank=4, alpha=8,
                                                 targets="all").state_dict().keys()
    plain = to_plain_model(model)
    assert not any(isinstance(m, (FoldedBatchNorm2d, FoldingLoraConv2d)) for m in plain.modules())
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-5, rtol=1e-5)


def test_lora_refuses_a_convnexts_grouped_depthwise_convolutions():
    with pytest.raises(GalaxyTuneError, match="not encoder.stages.0.blocks.0.conv_dw: choose other targets"):
        add_lora(build_model("timm:test_convnext"), rank=2, alpha=2, targets="all")
    with pytest.raises(GalaxyTuneError, match="LoRA targets 'conv3x3' match no layer of this model's blocks"):
        add_lora(build_model("timm:test_convnext"), rank=2, alpha=2, targets="conv3x3")


@pytest.mark.parametrize("training", [True, False])
def test_a_lora_linear_keeps_a_small_adapter_effect_under_bf16_autocast(training):
    torch.manual_seed(0)
    linear = nn.Linear(256, 256)
    lora = LoraLinear(linear, rank=8, alpha=8).train()
    with torch.no_grad():
        lora.lora_B.weight.normal_()
        lora.lora_B.weight *= 3e-4 * linear.weight.norm() / lora.delta_weight().norm()
    x = torch.randn(64, 256, requires_grad=training)
    with torch.no_grad():
        reference = lora(x) - linear(x)
    error = lambda effect: ((effect.float() - reference).norm() / reference.norm()).item()  # noqa: E731
    with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16):
        branch = (lora(x) - linear(x)).detach()
        merged = (nn.functional.linear(x, linear.weight + lora.delta_weight(), linear.bias) - linear(x)).detach()
        set_lora_sum(lora, "autocast")
        cast_back = (lora(x) - linear(x)).detach()
    assert error(branch) < 0.01  # within 1 % of fp32
    assert error(merged) > 0.5 and error(cast_back) > 0.5  # what the fp32 sum avoids


CHOOSING = """params:
  model: {type: categorical, choices: [tiny, "timm:test_convnext"]}
  lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
  epochs: 1
points_to_evaluate:
  - {model: tiny, lr: 1.0e-3}
  - {model: "timm:test_convnext", lr: 1.0e-3}
"""


def test_a_lora_space_whose_backbone_takes_none_of_its_targets_is_refused_before_any_data_is_prepared(
        ray_local, demo_dir, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(CHOOSING.replace("epochs: 1", "epochs: 1\n  lora_targets: conv3x3"))
    assert main(["search", "lora", "--data-dir", str(demo_dir), "--results-dir", str(tmp_path / "results"),
                 "--space", str(space)]) == 2
    err = capsys.readouterr().err
    assert f"search space {space}: model 'timm:test_convnext' takes no lora_targets 'conv3x3'" in err
    assert "give lora_targets a `when: {model: [...]}` condition" in err and err.count("\n") == 1
    # The shipped LoRA space searches every target: a ConvNeXt as --model takes neither conv3x3 nor all.
    assert main(["search", "lora", "--data-dir", str(demo_dir), "--results-dir", str(tmp_path / "results"),
                 "--model", "timm:test_convnext"]) == 2
    err = capsys.readouterr().err
    assert "--model timm:test_convnext takes no lora_targets 'all' (LoRA adapts plain convolutions" in err
    assert "search_spaces/lora.yaml without it (--space)" in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


def test_a_search_chooses_the_backbone_and_retrain_tests_each_with_every_method(ray_local, demo_dir, tmp_path,
                                                                               capsys):
    space = tmp_path / "space.yaml"
    space.write_text(CHOOSING)
    assert main(["search", "lora", "--data-dir", str(demo_dir), "--results-dir", str(tmp_path), "--name", "choose",
                 "--image-size", str(IMAGE_SIZE_PX), "--crop", str(CROP_PX), "--model", "timm:test_convnext",
                 "--space", str(space), "--num-samples", "2"]) == 0
    experiment = tmp_path / "choose"
    trials = pd.read_csv(experiment / "trials.csv")
    assert {json.loads(config)["model"] for config in trials["config"]} == {"tiny", "timm:test_convnext"}
    study = optuna.load_study(study_name="choose", storage=f"sqlite:///{experiment / 'optuna.db'}")
    assert {trial.params["model"] for trial in study.trials} == {"tiny", "timm:test_convnext"}
    assert "model" in json.loads((experiment / "best.json").read_text())["config"]

    # The search's top config of each backbone; full (no search) and direct on the search's --model, direct also
    # on every backbone the search chose.
    assert main(["retrain", "--results-dir", str(tmp_path), "--from", str(experiment), "--name", "retrain",
                 "--seeds", "1", "--max-epochs", "1"]) == 0
    retrain = tmp_path / "retrain"
    results = pd.read_csv(retrain / "test_results.csv")
    assert sorted(zip(results["method"], results["model"])) == [
        ("direct", "timm:test_convnext"), ("direct", "tiny"), ("full", "timm:test_convnext"),
        ("lora", "timm:test_convnext"), ("lora", "tiny")]
    report = (retrain / "report.md").read_text()
    assert "Backbones: `timm:test_convnext`, `tiny`." in report
    backbone_rows = report.split("## Backbones")[1].split("##")[0]
    for method, model in zip(results["method"], results["model"]):
        assert f"| {model} " in backbone_rows and f"| {method} " in backbone_rows
    assert (retrain / "cost_accuracy_frontier.png").is_file()

    # The full model's export is timm's own: it loads with timm alone, with its class names and the pixels it takes.
    hf = retrain / "full-seed0" / "hf"
    alone = timm.create_model(f"local-dir:{hf}", pretrained=True)
    assert alone.pretrained_cfg["label_names"] == ["Class6.2", "Class1.2"]
    assert alone.pretrained_cfg["input_size"] == (3, IMAGE_SIZE_PX, IMAGE_SIZE_PX)
    assert alone.pretrained_cfg["crop_pct"] == CROP_PX / 424
    model, class_names, *_ = load_exported(hf)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixel_values=IMAGES).logits, alone.eval()(IMAGES))
    assert json.loads((hf / "galaxy_tune.json").read_text())["mean"] == [0.5, 0.5, 0.5]
    capsys.readouterr()
    out = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(hf), "--images", str(demo_dir / IMAGES_DIR), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["GalaxyID", *class_names] and len(table) == 120
    assert (table[class_names].sum(axis=1) - 1).abs().max() < 1e-5


def test_a_retrain_planned_before_configs_named_their_backbone_resumes(tmp_path):
    from galaxy_tune.retrain import claim_retrain
    from galaxy_tune.train import REFERENCE_CONFIGS

    config = REFERENCE_CONFIGS["full"].to_dict()
    plan = {"methods": ["full"], "recipes": {"full": {"source": "reference recipe", "config": config}}}
    before = {"full": {"source": "reference recipe", "config": {k: v for k, v in config.items() if k != "model"}}}
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "recipes": before}))
    claim_retrain(tmp_path, plan, resume=True)  # the same config: its model is the default
    changed = {"full": {"source": "reference recipe", "config": {**config, "model": "timm:test_resnet"}}}
    with pytest.raises(GalaxyTuneError, match="was started with other the configs retrained"):
        claim_retrain(tmp_path, {**plan, "recipes": changed}, resume=True)
