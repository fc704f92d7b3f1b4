"""Model construction: initial weights from files, the offline ImageNet message, prediction shape."""

from __future__ import annotations

import pytest
import torch
from torchvision import models

from pipeline.model import build_model, freeze_backbone, predict


def test_state_dict_file_initialises_the_backbone_and_gets_a_new_head(tmp_path):
    source = build_model(5)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    model = build_model(3, weights=str(path))
    assert torch.equal(model.net.conv1.weight, source.net.conv1.weight)
    assert model.net.fc.out_features == 3


def test_bare_torchvision_resnet18_state_dict_is_accepted(tmp_path):
    source = models.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    model = build_model(4, weights=str(path))
    assert torch.equal(model.net.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit ResNet18"):
        build_model(3, weights=str(path))


def test_missing_weights_file_names_the_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match="imagenet"):
        build_model(3, weights=str(tmp_path / "nope.pt"))


def test_imagenet_weights_that_cannot_be_loaded_fail_with_what_to_do(tmp_path, monkeypatch):
    # A corrupt file where torchvision caches the weights: loading fails whether or not this
    # machine is online, and the message must say where the file goes.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = models.ResNet18_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / enum.url.rsplit("/", 1)[-1]).write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError) as err:
        build_model(3, weights="imagenet")
    assert str(cache) in str(err.value) and "weights=none" in str(err.value)


def test_freeze_backbone_leaves_only_the_head_trainable():
    model = build_model(3)
    freeze_backbone(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net.fc.weight", "net.fc.bias"}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predict_returns_top_k_sorted_for_any_batch_size(precision):
    model = build_model(4).eval()
    preds = predict(
        model, torch.rand(5, 3, 32, 32), ["a", "b", "c", "d"], top_k=3, precision=precision
    )
    assert len(preds) == 5
    for p in preds:
        assert len(p.labels) == 3 and list(p.probs) == sorted(p.probs, reverse=True)
        assert p.label in "abcd" and 0 < p.confidence <= 1


def test_predict_refuses_unknown_precision():
    with pytest.raises(ValueError, match="expected one of: auto, fp32, bf16, int8"):
        predict(build_model(2).eval(), torch.rand(1, 3, 32, 32), ["a", "b"], precision="int4")
