"""The real torchvision and segmentation_models_pytorch models (each test skips without its library; CI runs them
in a second environment that has both, see ``.ci/run``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import ContextAwareClassifier, replace_classifier, supervise
from adaptive_heads.registry import HEADS


def _train_steps(model, images, target, key=None, steps=2):
    """Two SGD steps through supervise; returns the last logits and the per-term losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        with supervise(model, target) as sup:
            out = model(images)
            logits = out[key] if key else out
            terms = sup.losses()
            loss = F.cross_entropy(logits, target, ignore_index=255) + terms["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(v) for v in terms.values())
    return logits, terms


# ----------------------------------------------------------------------------- torchvision
TORCHVISION_MODELS = {
    "fcn_resnet50": {"weights": None, "weights_backbone": None, "aux_loss": True},
    "deeplabv3_mobilenet_v3_large": {"weights": None, "weights_backbone": None, "aux_loss": True},
}


@pytest.mark.parametrize("builder", list(TORCHVISION_MODELS))
@pytest.mark.parametrize("name", list(HEADS))
def test_torchvision_with_auxiliary_head_trains_evaluates_exports(builder, name):
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    model = getattr(segmentation, builder)(num_classes=4, **TORCHVISION_MODELS[builder])
    original = model.classifier[4].weight.clone()
    replace_classifier(model, HEADS[name], include_aux=True)
    assert model.adaptive_head_paths == ["classifier.4", "aux_classifier.4"]
    head = model.classifier[4]
    if hasattr(head, "conv_seg"):
        assert torch.equal(head.conv_seg.weight, original)
    images, target = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    target[0, :5] = 255
    logits, terms = _train_steps(model, images, target, key="out", steps=1)
    assert logits.shape == (2, 4, 64, 64)
    assert any(k.startswith("aux_classifier.4.") for k in terms)  # the auxiliary head trains too
    model.eval()
    with torch.no_grad():
        out = model(images)["out"]
    assert out.shape == (2, 4, 64, 64)
    for path in model.adaptive_head_paths:
        model.get_submodule(path).strip_training_layers()
    exported = torch.export.export(model, (images,))
    torch.testing.assert_close(exported.module()(images)["out"], out, rtol=1e-4, atol=1e-4)


def test_torchvision_lraspp_is_refused():
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    model = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    with pytest.raises(ValueError, match="sums two classifier convs"):
        replace_classifier(model, ContextAwareClassifier)
    replace_classifier(model, ContextAwareClassifier, path="classifier.high_classifier")
    assert isinstance(model.classifier.high_classifier, ContextAwareClassifier)


# ----------------------------------------------------------------------------- segmentation_models_pytorch
#: every smp architecture: the kernel of its classifier conv (``segmentation_head.0``; DPT ``.head.4``)
SMP_ARCHITECTURES = {
    "Unet": 3, "UnetPlusPlus": 3, "MAnet": 3, "Linknet": 1, "FPN": 1, "PSPNet": 3, "PAN": 3, "DeepLabV3": 1,
    "DeepLabV3Plus": 1, "UPerNet": 1, "Segformer": 1, "DPT": 1,
}  # fmt: skip
#: input sizes above 64 px for the architectures whose pooling (or ViT encoder) needs them
SMP_SIZES = {"PAN": 128, "DeepLabV3": 128, "DPT": 224}
#: encoders other than resnet18 (DPT takes timm ViTs only)
SMP_ENCODERS = {"DPT": "tu-vit_tiny_patch16_224"}


@pytest.mark.parametrize("architecture", list(SMP_ARCHITECTURES))
@pytest.mark.parametrize("name", list(HEADS))
def test_smp_architecture_trains_with_each_head(architecture, name):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    encoder = SMP_ENCODERS.get(architecture, "resnet18")
    model = getattr(smp, architecture)(encoder_name=encoder, encoder_weights=None, classes=4).eval()
    size = SMP_SIZES.get(architecture, 64)
    images, target = torch.randn(2, 3, size, size), torch.randint(0, 4, (2, size, size))
    path = "segmentation_head.head.4" if architecture == "DPT" else "segmentation_head.0"
    conv = model.get_submodule(path)
    assert conv.kernel_size == (SMP_ARCHITECTURES[architecture],) * 2
    with torch.no_grad():
        features = {}
        hook = conv.register_forward_hook(lambda m, args, out: features.update(x=args[0], logits=out))
        model(images)
        hook.remove()
    replace_classifier(model, HEADS[name])
    assert model.adaptive_head_paths == [path]
    head = model.get_submodule(path)
    if hasattr(head, "coarse_logits"):  # CAC / SSA: the model's own logits as the coarse prediction
        exact = conv.kernel_size != (1, 1)  # a k×k conv is the same conv; a 1×1 one becomes a matmul (rounding)
        tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-5}
        with torch.no_grad():
            torch.testing.assert_close(head.coarse_logits(features["x"]), features["logits"], **tol)
    logits, _ = _train_steps(model, images, target, steps=1)
    assert logits.shape == (2, 4, size, size)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()
