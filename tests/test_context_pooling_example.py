"""The CamVid robustness experiment's pooling variants (``examples/context_pooling.py``): heads that override
``CosineHead.context_weights``, the library's hook for which pixels pool a class prototype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adaptive_heads as ah
from examples.context_pooling import confident_class_weights, pooled_head, predicted_class_weights

from .conftest import FAST_OPTIONS
from .test_slide import PixelLocal, centre_position_conv

COSINE_HEADS = {"cac": ah.ContextAwareClassifier, "ssa": ah.SSAClassifier}


def _pooled(name: str, pooling: str, **options) -> ah.AdaptiveHead:
    cls = COSINE_HEADS[name]
    return pooled_head(cls, pooling)(8, 5, **{**FAST_OPTIONS.get(cls, {}), **options})


def test_predicted_class_weights_keep_the_argmax_class_only():
    torch.manual_seed(0)
    probs = torch.randn(2, 5, 6, 7).softmax(1)
    expected = probs * F.one_hot(probs.argmax(1), 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(predicted_class_weights(probs), expected, rtol=0, atol=0)
    tied = torch.tensor([[[0.5], [0.5], [0.0]]])
    assert predicted_class_weights(tied).flatten().tolist() == [0.5, 0.5, 0.0]


def test_confident_class_weights_scale_the_predicted_class_by_one_minus_the_normalised_entropy():
    torch.manual_seed(0)
    probs = torch.randn(2, 5, 6, 7, dtype=torch.float64).softmax(1)
    entropy = -(probs * probs.log()).sum(1, keepdim=True)
    expected = predicted_class_weights(probs) * (1 - entropy / np.log(5))
    torch.testing.assert_close(confident_class_weights(probs), expected, rtol=1e-12, atol=0)
    even_and_sure = torch.tensor([[[0.25, 1.0], [0.25, 0.0], [0.25, 0.0], [0.25, 0.0]]])  # [B=1, n=4, N=2]
    assert confident_class_weights(even_and_sure).flatten().tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    one_class = torch.ones(1, 1, 3)
    assert confident_class_weights(one_class).tolist() == one_class.tolist()
    assert confident_class_weights(torch.zeros(1, 3, 2).index_fill(1, torch.tensor([0]), 1.0)).isfinite().all()


def test_confident_class_weights_gate_is_detached():
    """Gradients flow through the kept probabilities only, scaled by the (constant) confidence of each pixel."""
    torch.manual_seed(0)
    probs = torch.randn(2, 4, 5, dtype=torch.float64).softmax(1).requires_grad_()
    entropy = -(probs * probs.log()).sum(1, keepdim=True)
    confidence = 1 - entropy / np.log(4)
    weights = torch.randn(2, 4, 5, dtype=torch.float64)
    (confident_class_weights(probs) * weights).sum().backward()
    mask = predicted_class_weights(probs.detach()) > 0
    torch.testing.assert_close(probs.grad, weights * mask * confidence.detach())


@pytest.mark.parametrize("pooling", ["predicted", "confident"])
def test_a_pooled_cac_is_the_hand_computed_classifier(pooling):
    torch.manual_seed(0)
    head = pooled_head(ah.ContextAwareClassifier, pooling)(6, 4).eval()
    feat = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        coarse = head.conv_seg(feat).flatten(2)  # [B, n, N]
        probs = coarse.softmax(1)
        weights = probs * (probs.argmax(1, keepdim=True) == torch.arange(4).view(1, 4, 1))
        if pooling == "confident":  # times one minus the pixel's normalised entropy
            weights = weights * (1 + (probs * probs.log()).sum(1, keepdim=True) / np.log(4))
        x = feat.flatten(2)  # [B, C, N]
        prototypes = torch.einsum("bkn,bcn->bkc", weights, x) / (weights.sum(-1, keepdim=True) + head.eps)
        w = head.conv_seg.weight.flatten(1).expand(2, -1, -1)
        classifier = head.proj(torch.cat([prototypes, w], dim=-1))  # [B, n, C]
        cosine = torch.einsum("bkc,bcn->bkn", F.normalize(classifier, dim=-1, eps=0), F.normalize(x, dim=1, eps=0))
        expected = (head.tau * cosine).view(2, 4, 5, 7)
        torch.testing.assert_close(head(feat), expected, rtol=1e-5, atol=1e-5)
        head.context_pooling = "soft"  # the official pooling, on the same weights
        assert (head(feat) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(COSINE_HEADS))
@pytest.mark.parametrize("pooling", ["predicted", "confident"])
def test_a_pooled_head_changes_the_semantic_prototypes_in_training_too(name, pooling):
    torch.manual_seed(0)
    head = _pooled(name, pooling, dropout=0.0)
    official = COSINE_HEADS[name](8, 5, **{**FAST_OPTIONS.get(COSINE_HEADS[name], {}), "dropout": 0.0})
    official.load_state_dict(head.state_dict())
    feat, target = torch.randn(2, 8, 6, 6), torch.randint(0, 5, (2, 12, 12))
    out_official, out_pooled = official(feat, target), head(feat, target)
    assert (out_official.logits - out_pooled.logits).abs().max() > 1e-3
    torch.testing.assert_close(out_official.coarse, out_pooled.coarse)  # the coarse conv and the teacher are not
    torch.testing.assert_close(out_official.teacher, out_pooled.teacher)  # touched
    head.default_loss()(out_pooled, target)["loss"].backward()
    assert head.conv_seg.weight.grad.abs().sum() > 0  # the kept weights carry gradients to the coarse conv


@pytest.mark.parametrize("name", list(COSINE_HEADS))
@pytest.mark.parametrize("pooling", ["predicted", "confident"])
def test_image_context_slide_equals_whole_image_with_a_pooled_head(name, pooling):
    torch.manual_seed(0)
    head = _pooled(name, pooling)
    if name == "ssa":  # position features with a 1×1 footprint: the exact case (test_slide)
        centre_position_conv(head)
    model = PixelLocal(head).eval().double()  # float64: exact up to the order of the sums
    images = torch.randn(2, 3, 29, 33, dtype=torch.float64)
    out = ah.slide_inference(model, images, (16, 16), (10, 12), context="image")
    torch.testing.assert_close(out, model(images), rtol=1e-10, atol=1e-10)


def test_pooled_heads_save_as_the_library_heads_they_extend():
    """A checkpoint of a pooled head loads into the library head (and back): the pooling is the subclass's, not an
    option of the weights."""
    head = _pooled("ssa", "confident")
    saved = head.state_dict()
    official = ah.SSAClassifier(8, 5, **FAST_OPTIONS.get(ah.SSAClassifier, {}))
    official.load_state_dict(saved)
    assert type(head).__name__ == "ConfidentSSAClassifier"
    with pytest.raises(ValueError, match="context_pooling must be one of"):
        pooled_head(ah.ContextAwareClassifier, "hard")
