"""The cosine heads' options for scenes unlike the training ones: ``context_pooling="predicted"`` or
``"confident"`` (not in the papers; the default stays the official code's)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adaptive_heads as ah
from adaptive_heads.functional import confident_class_weights, predicted_class_weights

from .conftest import make_head
from .test_slide import pixel_local

COSINE_HEADS = ["cac", "ssa"]


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """``source``'s tensors into ``target``, a head built with other options (without the saved options, whose
    absence the load reports)."""
    weights = {k: v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    with pytest.warns(UserWarning, match="no saved options"):
        target.load_state_dict(weights, strict=False)


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
def test_cac_pooling_option_is_the_hand_computed_classifier(pooling):
    torch.manual_seed(0)
    head = ah.ContextAwareClassifier(6, 4, context_pooling=pooling).eval()
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
        official = ah.ContextAwareClassifier(6, 4).eval()
        copy_weights(head, official)
        assert (official(feat) - expected).abs().max() > 1e-3  # the option changes the classifier


@pytest.mark.parametrize("name", COSINE_HEADS)
@pytest.mark.parametrize("pooling", ["predicted", "confident"])
def test_pooling_option_changes_the_semantic_prototypes_in_training_too(name, pooling):
    torch.manual_seed(0)
    soft = make_head(name, 8, 5, dropout=0.0)
    predicted = make_head(name, 8, 5, dropout=0.0, context_pooling=pooling)
    copy_weights(soft, predicted)
    feat, target = torch.randn(2, 8, 6, 6), torch.randint(0, 5, (2, 12, 12))
    out_soft, out_predicted = soft(feat, target), predicted(feat, target)
    assert (out_soft.logits - out_predicted.logits).abs().max() > 1e-3
    torch.testing.assert_close(out_soft.coarse, out_predicted.coarse)  # the coarse conv and the teacher are not
    torch.testing.assert_close(out_soft.teacher, out_predicted.teacher)  # touched
    predicted.default_loss()(out_predicted, target)["loss"].backward()
    assert predicted.conv_seg.weight.grad.abs().sum() > 0  # the kept weights carry gradients to the coarse conv


@pytest.mark.parametrize("name", COSINE_HEADS)
@pytest.mark.parametrize("pooling", ["predicted", "confident"])
def test_image_context_slide_equals_whole_image_with_the_options(name, pooling):
    model = pixel_local(name, context_pooling=pooling).double()  # float64: exact up to the order of the sums
    images = torch.randn(2, 3, 29, 33, dtype=torch.float64)
    out = ah.slide_inference(model, images, (16, 16), (10, 12), context="image")
    torch.testing.assert_close(out, model(images), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", COSINE_HEADS)
def test_context_pooling_is_a_function_option(name):
    saved = make_head(name, 8, 5).state_dict()
    with pytest.warns(UserWarning, match="context_pooling='soft'"), pytest.raises(RuntimeError, match="_extra_state"):
        make_head(name, 8, 5, context_pooling="confident").load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_head(name, 8, 5, context_pooling="confident").load_state_dict(
            make_head(name, 8, 5, context_pooling="confident").state_dict()
        )


def test_option_errors_and_numpy_values():
    with pytest.raises(ValueError, match="context_pooling"):
        ah.ContextAwareClassifier(8, 5, context_pooling="hard")
    head = ah.SSAClassifier(8, 5, context_pooling=np.str_("confident"))
    assert type(head.options()["context_pooling"]) is str
    head.state_dict()  # the saved options are JSON
