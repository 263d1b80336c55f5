"""The drop-in path: replace_classifier + supervise inside models that pass only features to the classifier."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptive_heads import ContextAwareClassifier, ContextAwareLoss, find_classifier, replace_classifier, supervise

from .conftest import make_head
from .models import PlainSegmenter, TinyFCN


def test_replace_known_path_copies_weights():
    torch.manual_seed(0)
    model = TinyFCN()
    old = model.classifier[4]
    replace_classifier(model, ContextAwareClassifier)
    head = model.classifier[4]
    assert isinstance(head, ContextAwareClassifier) and model.adaptive_head_paths == ["classifier.4"]
    assert torch.equal(head.conv_seg.weight, old.weight) and torch.equal(head.conv_seg.bias, old.bias)
    assert isinstance(model.aux_classifier[4], nn.Conv2d)  # aux untouched by default


def test_replace_with_aux_and_factory_kwargs():
    model = TinyFCN()
    replace_classifier(model, functools.partial(ContextAwareClassifier, tau=10.0), include_aux=True)
    assert model.adaptive_head_paths == ["classifier.4", "aux_classifier.4"]
    assert model.aux_classifier[4].tau == 10.0


def test_fallback_finds_last_conv_with_num_classes():
    model = PlainSegmenter(num_classes=4)
    assert find_classifier(model, num_classes=4) == ["decoder.cls"]
    with pytest.raises(ValueError, match="num_classes"):
        find_classifier(model)
    replace_classifier(model, ContextAwareClassifier, num_classes=4)
    assert isinstance(model.decoder["cls"], ContextAwareClassifier)
    with pytest.raises(ValueError, match="already an adaptive head"):
        replace_classifier(model, ContextAwareClassifier, path="decoder.cls")


def test_replace_refuses_size_changing_convs():
    model = PlainSegmenter()
    model.decoder["cls"] = nn.Conv2d(8, 4, 3, padding=0)  # logits smaller than the features
    with pytest.raises(ValueError, match=r"3×3 conv with stride \(1, 1\), padding \(0, 0\).*keep the feature map"):
        replace_classifier(model, ContextAwareClassifier, num_classes=4)
    model.decoder["cls"] = nn.Conv2d(8, 4, 1, stride=2)
    with pytest.raises(ValueError, match="stride \\(2, 2\\)"):
        replace_classifier(model, ContextAwareClassifier, num_classes=4)

    # summed classifiers (torchvision's LR-ASPP) are refused: tests/integrations/test_torchvision_smp.py
    with pytest.raises(ValueError, match="no submodule"):
        replace_classifier(model, ContextAwareClassifier, path="decoder.nope")


class UnetLike(nn.Module):
    """A decoder ending in a 3×3 (or 5×5, dilated) classifier, as smp's Unet, PSPNet, PAN and MAnet."""

    def __init__(self, num_classes: int = 4, width: int = 8, kernel: int = 3, dilation: int = 1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.decoder = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        pad = dilation * (kernel - 1) // 2
        self.segmentation_head = nn.Sequential(nn.Conv2d(width, num_classes, kernel, padding=pad, dilation=dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(x))


@pytest.mark.parametrize(("kernel", "dilation"), [(3, 1), (5, 1), (3, 2)])
def test_kxk_classifier_swaps_with_exact_coarse_logits(head_name, kernel, dilation):
    torch.manual_seed(0)
    model = UnetLike(kernel=kernel, dilation=dilation).eval()
    images = torch.randn(2, 3, 12, 14)
    original = model(images)
    conv = model.segmentation_head[0]
    replace_classifier(model, lambda c, n: make_head(head_name, c, n), path="segmentation_head.0")
    head = model.segmentation_head[0]
    feat = model.decoder(images)
    if head_name == "proto":  # no coarse classifier to copy into: replaced like a 1×1 conv
        assert not hasattr(head, "conv_seg")
    else:
        assert head.conv_seg.kernel_size == conv.kernel_size and head.conv_seg.dilation == conv.dilation
        torch.testing.assert_close(head.coarse_logits(feat), original, rtol=0, atol=0)
        weight = conv.weight.detach()
        c = kernel // 2
        torch.testing.assert_close(head.classifier_weight, weight.sum(dim=(2, 3)))  # default: sum over the taps
        head.class_direction = "centre"
        torch.testing.assert_close(head.classifier_weight, weight[:, :, c, c])
    assert model(images).shape == original.shape
    model.train()
    target = torch.randint(0, 4, (2, 12, 14))
    with supervise(model, target) as sup:
        loss = F.cross_entropy(model(images), target) + sup.loss()
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if head_name != "proto":  # the class directions reach the whole kernel
        assert (head.conv_seg.weight.grad != 0).all()


def test_kxk_head_from_scratch_and_options():
    head = ContextAwareClassifier(8, 3, kernel_size=3, class_direction="centre")
    assert head.conv_seg.kernel_size == (3, 3) and head.conv_seg.padding == (1, 1)
    assert head(torch.randn(1, 8, 5, 6)).shape == (1, 3, 5, 6)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int, got 2"):
        ContextAwareClassifier(8, 3, kernel_size=2)
    with pytest.raises(ValueError, match="class_direction must be 'sum' or 'centre'"):
        ContextAwareClassifier(8, 3, class_direction="mean")


def test_one_by_one_behaviour_unchanged_by_the_kxk_support():
    torch.manual_seed(0)
    model = TinyFCN()
    conv = model.classifier[4]
    replace_classifier(model, ContextAwareClassifier)
    head = model.classifier[4]
    assert head.conv_seg.kernel_size == (1, 1)
    torch.testing.assert_close(head.classifier_weight, conv.weight.detach().reshape(4, 8), rtol=0, atol=0)


def test_eval_output_unchanged_shape_and_label_free():
    model = TinyFCN()
    replace_classifier(model, ContextAwareClassifier)
    model.eval()
    out = model(torch.randn(2, 3, 16, 16))["out"]
    assert out.shape == (2, 4, 16, 16)


def test_supervise_end_to_end_matches_direct_call():
    torch.manual_seed(0)
    model = TinyFCN()
    replace_classifier(model, functools.partial(ContextAwareClassifier, dropout=0.0))
    model.train()
    assert isinstance(model.classifier[3], torch.nn.Identity)  # the host's dropout moved into the head: rate 0
    images, target = torch.randn(2, 3, 16, 16), torch.randint(0, 4, (2, 16, 16))
    target[0, :2] = 255
    with supervise(model, target) as sup:
        logits = model(images)["out"]
        main = F.cross_entropy(logits, target, ignore_index=255)
        losses = sup.losses()
        total = main + sup.loss()
    assert set(losses) == {"classifier.4.ce_coarse", "classifier.4.ce", "classifier.4.ce_teacher",
                           "classifier.4.distill", "adaptive_loss"}  # fmt: skip
    # the same numbers by calling the head directly on the decoder features
    feats = model.classifier[:4](model.backbone(images))
    direct = ContextAwareLoss()(model.classifier[4](feats, target), target)
    for k in ("ce_coarse", "ce_teacher", "distill"):
        torch.testing.assert_close(losses[f"classifier.4.{k}"], direct[k])
    torch.testing.assert_close(losses["adaptive_loss"], direct["ce_coarse"] + direct["ce_teacher"] + direct["distill"])
    total.backward()
    assert model.classifier[4].apd_proj[0].weight.grad is not None  # the oracle branch was trained
    assert model.classifier[4]._supervisor is None  # context cleaned up
    with supervise(model, target) as sup:
        model(images)
        with_main = sup.loss(include_main=True)
        torch.testing.assert_close(with_main, sup.loss() + sup.losses()["classifier.4.ce"])


def test_supervise_errors():
    with pytest.raises(ValueError, match="no adaptive head"):
        supervise(TinyFCN(), torch.zeros(1, 4, 4, dtype=torch.long))
    model = TinyFCN()
    replace_classifier(model, ContextAwareClassifier)
    model.eval()
    with supervise(model, torch.zeros(1, 8, 8, dtype=torch.long)) as sup:
        model(torch.randn(1, 3, 8, 8))
        with pytest.raises(RuntimeError, match="train"):
            sup.loss()
    model.train()
    with supervise(model, torch.full((1, 8, 8), 9)):
        with pytest.raises(ValueError, match="outside"):
            model(torch.randn(1, 3, 8, 8))
    assert model.classifier[4]._supervisor is None


def test_supervise_custom_loss_module():
    model = TinyFCN()
    replace_classifier(model, ContextAwareClassifier)
    target = torch.randint(0, 4, (2, 16, 16))
    loss_fn = ContextAwareLoss(weights={"ce_coarse": 0, "ce_teacher": 0, "distill": 3.0})
    with supervise(model, target, loss_fns=loss_fn) as s:
        model(torch.randn(2, 3, 16, 16))
        terms = s.losses()
    torch.testing.assert_close(terms["adaptive_loss"], 3.0 * terms["classifier.4.distill"])


def test_hf_segformer_end_to_end():
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
        decoder_hidden_size=16, num_labels=5, semantic_loss_ignore_index=255,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(config)
    original = model.decode_head.classifier
    replace_classifier(model, ContextAwareClassifier)
    head = model.decode_head.classifier
    assert isinstance(head, ContextAwareClassifier) and torch.equal(head.conv_seg.weight, original.weight)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    model.train()
    with supervise(model, labels) as sup:
        out = model(pixel_values=images, labels=labels)
        loss = out.loss + sup.loss()
    assert out.logits.shape == (2, 5, 8, 8)
    assert torch.isfinite(loss)
    loss.backward()
    assert head.apd_proj[0].weight.grad is not None and head.proj[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=images).logits
    assert logits.shape == (2, 5, 8, 8) and logits.abs().max() <= 15 + 1e-4


def test_supervise_and_replace_every_head(head_name):
    """Each head inside a torchvision-shaped model: its named terms, the extra-terms total, gradients everywhere."""
    torch.manual_seed(0)
    model = replace_classifier(TinyFCN(num_classes=5), lambda c, n: make_head(head_name, c, n))
    head = model.classifier[4]
    images, target = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2, 16, 16))
    with supervise(model, target) as sup:
        logits = model(images)["out"]
        loss = F.cross_entropy(logits, target) + sup.loss()
        terms = sup.losses()
    loss_fn = head.default_loss()
    assert set(terms) == {f"classifier.4.{k}" for k in loss_fn.default_weights} | {"adaptive_loss"}
    expected = sum(w * terms[f"classifier.4.{k}"] for k, w in loss_fn.weights.items() if k != loss_fn.main_term)
    torch.testing.assert_close(terms["adaptive_loss"], expected)
    assert all(torch.isfinite(v) for v in terms.values())
    loss.backward()
    for name, p in head.named_parameters():  # the label-built branches (oracle, teacher) are trained too
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
