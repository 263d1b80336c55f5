"""The real torchvision and segmentation_models_pytorch models (each test skips without its library; CI runs them
in its oldest and newest environments, see ``.ci/run``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import ContextAwareClassifier, replace_classifier, supervise
from adaptive_heads.registry import HEADS

from ..conftest import assert_dropout_on_the_coarse_path_only


def _train_steps(model, images, target, key=None, steps=2):
    """Two SGD steps through supervise; returns the last logits and the per-term losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        with supervise(model, target) as sup:
            out = model(images)
            logits = out[key] if key else out
            terms = sup.losses()
            loss = F.cross_entropy(logits, target, ignore_index=255) + terms["adaptive_loss"]
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
    if not hasattr(smp, architecture):
        pytest.skip(f"segmentation_models_pytorch {smp.__version__} has no {architecture} (DPT: smp >= 0.5)")
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


# ----------------------------------------------------------------------------- the seams (issue 22)
def _fcn_resnet50(num_classes: int = 4):
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    return segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=True)


@pytest.mark.parametrize("name", ["cac", "ssa"])
def test_torchvision_dropout_moves_to_the_coarse_path_of_main_and_aux_heads(name):
    torch.manual_seed(0)
    model = _fcn_resnet50()
    replace_classifier(model, HEADS[name], include_aux=True)
    for head_path in ("classifier", "aux_classifier"):
        sequential = model.get_submodule(head_path)
        assert isinstance(sequential[3], torch.nn.Identity)  # was torchvision's Dropout(0.1)
        assert sequential[4].dropout.p == 0.1
    images, target = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    assert_dropout_on_the_coarse_path_only(model, lambda: model(images), target, ["classifier.4", "aux_classifier.4"])
    assert model.adaptive_head_weights == {"aux_classifier.4": 0.5}


def test_torchvision_model_inside_a_wrapper_and_main_head_after_two_calls():
    from adaptive_heads import find_classifier, slide_inference

    class Lightningish(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loss = torch.nn.CrossEntropyLoss()
            self.model = _fcn_resnet50()

        def forward(self, x):
            return self.model(x)

    torch.manual_seed(0)
    wrapper = Lightningish()
    assert find_classifier(wrapper, include_aux=True) == ["model.classifier.4", "model.aux_classifier.4"]
    replace_classifier(wrapper, ContextAwareClassifier)
    replace_classifier(wrapper, ContextAwareClassifier, path="model.aux_classifier.4")
    assert wrapper.adaptive_head_paths == ["model.classifier.4", "model.aux_classifier.4"]
    wrapper.eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = wrapper(images)
        image = slide_inference(wrapper, images, crop_size=64, stride=64, context="image")
    torch.testing.assert_close(image, out["out"], rtol=1e-4, atol=1e-4)  # the main head's, not the aux head's
    assert (image - out["aux"]).abs().max() > 1e-2


@pytest.mark.parametrize("context", ["tile", "image"])
def test_torchvision_one_tile_equals_the_plain_forward(context):
    from adaptive_heads import slide_inference

    torch.manual_seed(0)
    model = replace_classifier(_fcn_resnet50(), HEADS["ssa"], include_aux=True).eval()
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        tiled = slide_inference(model, images, crop_size=(48, 64), stride=(48, 64), context=context)
        torch.testing.assert_close(tiled, model(images)["out"], rtol=1e-4, atol=1e-4)


def test_smp_subclass_is_found():
    smp = pytest.importorskip("segmentation_models_pytorch")
    from adaptive_heads import find_classifier

    class MyUnet(smp.Unet):
        pass

    model = MyUnet(encoder_name="resnet18", encoder_weights=None, classes=3)
    assert find_classifier(model) == ["segmentation_head.0"]


@pytest.mark.parametrize("activation", [None, "softmax", "sigmoid"])
@pytest.mark.parametrize("name", ["cac", "ssa"])
def test_smp_image_context_goes_through_the_segmentation_head(name, activation):
    """smp's SegmentationHead upsamples (``align_corners=True``) and applies the activation after the classifier:
    image context must apply them too. One tile = the plain forward (any model); over pixel-local features, image
    context = whole-image inference."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    from segmentation_models_pytorch.base import SegmentationHead

    from adaptive_heads import slide_inference

    torch.manual_seed(0)
    model = smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=4, activation=activation)
    with warnings.catch_warnings():  # returning probabilities is warned about (tested below); image context works
        warnings.simplefilter("ignore")
        replace_classifier(model, HEADS[name])
    model.eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        one_tile = slide_inference(model, images, crop_size=(64, 96), stride=(64, 96), context="image")
        torch.testing.assert_close(one_tile, model(images), rtol=1e-4, atol=1e-4)

    class PixelLocal(torch.nn.Module):  # 1×1 features, then the real smp SegmentationHead (classifier + activation)
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.ReLU())
            self.segmentation_head = SegmentationHead(16, 4, kernel_size=1, activation=activation)

        def forward(self, x):
            return self.segmentation_head(self.features(x))

    local = PixelLocal()
    replace_classifier(local, HEADS[name], path="segmentation_head.0")
    if name == "ssa":  # a pixel-local position kernel (only its centre tap)
        conv = local.segmentation_head[0].get_feat_pos
        with torch.no_grad():
            conv.weight[..., [0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2]] = 0
    local.eval()
    with torch.no_grad():
        whole = local(images)
        image = slide_inference(local, images, crop_size=40, stride=28, context="image")
    torch.testing.assert_close(image, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["softmax2d", "sigmoid", None, "logsoftmax"])
def test_smp_built_with_an_activation_is_warned_of(activation):
    """smp's ``activation=`` makes ``model(x)`` return probabilities: a CE on them trains on probabilities."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=4, activation=activation)
    if activation in ("softmax2d", "sigmoid"):
        with pytest.warns(UserWarning, match=r"segmentation_head.2.* returns probabilities.*activation=None"):
            replace_classifier(model, "cac")
    else:  # no activation, or log-probabilities (their CE is the CE of the logits)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            replace_classifier(model, "cac")


@pytest.mark.parametrize("architecture", ["FPN", "PSPNet", "DPT"])
def test_smp_decoder_dropout_moves_to_the_coarse_path(architecture):
    smp = pytest.importorskip("segmentation_models_pytorch")
    if not hasattr(smp, architecture):
        pytest.skip(f"this smp has no {architecture}")
    if architecture == "DPT":  # a ViT encoder from timm, built without weights
        model = smp.DPT(encoder_name="tu-vit_tiny_patch16_224", encoder_weights=None, classes=4)
        dropout, head = "segmentation_head.head.3", "segmentation_head.head.4"
    else:
        model = getattr(smp, architecture)(encoder_name="resnet18", encoder_weights=None, classes=4)
        dropout, head = "decoder.dropout", "segmentation_head.0"
    assert isinstance(model.get_submodule(dropout), torch.nn.modules.dropout._DropoutNd)
    rate = model.get_submodule(dropout).p
    replace_classifier(model, ContextAwareClassifier)
    assert isinstance(model.get_submodule(dropout), torch.nn.Identity)
    assert model.get_submodule(head).dropout.p == rate  # smp's rate (decoder_dropout 0.2, DPT's head 0.1)
