"""torchvision and segmentation_models_pytorch models (each test skips without its library)."""

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import ContextAwareClassifier, replace_classifier, supervise
from adaptive_heads.registry import HEADS


def _train_step(model, images, target, key=None):
    model.train()
    with supervise(model, target) as sup:
        out = model(images)
        logits = out[key] if key else out
        loss = F.cross_entropy(logits, target, ignore_index=255) + sup.loss()
    loss.backward()
    return logits


@pytest.mark.parametrize("head_cls", list(HEADS.values()), ids=list(HEADS))
def test_torchvision_deeplabv3_with_aux(head_cls):
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    model = segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4, aux_loss=True)
    original = model.classifier[4].weight.clone()
    replace_classifier(model, head_cls, include_aux=True)
    assert model.adaptive_head_paths == ["classifier.4", "aux_classifier.4"]
    head = model.classifier[4]
    if hasattr(head, "conv_seg"):
        assert torch.equal(head.conv_seg.weight, original)
    images, target = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    logits = _train_step(model, images, target, key="out")
    assert logits.shape == (2, 4, 64, 64)
    model.eval()
    with torch.no_grad():
        assert model(images)["out"].shape == (2, 4, 64, 64)


def test_torchvision_lraspp_is_refused():
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    model = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    with pytest.raises(ValueError, match="sums two classifier convs"):
        replace_classifier(model, ContextAwareClassifier)
    replace_classifier(model, ContextAwareClassifier, path="classifier.high_classifier")
    assert isinstance(model.classifier.high_classifier, ContextAwareClassifier)


def test_smp_fpn_and_unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=4)
    replace_classifier(model, ContextAwareClassifier)
    assert model.adaptive_head_paths == ["segmentation_head.0"]
    images, target = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    assert _train_step(model, images, target).shape == (2, 4, 64, 64)
    unet = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=4)
    with pytest.raises(ValueError, match="3×3 conv"):
        replace_classifier(unet, ContextAwareClassifier)
