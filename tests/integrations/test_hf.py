"""HF transformers integration (skips without transformers)."""

import pytest
import torch

from adaptive_heads import ContextAwareClassifier
from adaptive_heads.registry import HEADS

transformers = pytest.importorskip("transformers")
from adaptive_heads.integrations.hf import AdaptiveSegmentationModel  # noqa: E402


def _segformer():
    config = transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
        decoder_hidden_size=16, num_labels=5, semantic_loss_ignore_index=255,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.SegformerForSemanticSegmentation(config)


def _upernet():
    stages = ["stage1", "stage2", "stage3", "stage4"]
    backbone = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=stages
    )
    config = transformers.UperNetConfig(
        backbone_config=backbone, hidden_size=16, auxiliary_channels=8, num_labels=5, use_auxiliary_head=True
    )
    torch.manual_seed(0)
    return transformers.UperNetForSemanticSegmentation(config)


@pytest.mark.parametrize("head_cls", list(HEADS.values()), ids=list(HEADS))
def test_segformer_loss_includes_adaptive_terms(head_cls):
    base = _segformer()
    model = AdaptiveSegmentationModel(base, head_cls)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    model.train()
    out = model(pixel_values=images, labels=labels)
    assert out.logits.shape == (2, 5, 8, 8)
    extra = model.last_losses["loss"]
    # the model's own CE on the returned logits + the extra terms
    up = torch.nn.functional.interpolate(out.logits, size=(32, 32), mode="bilinear", align_corners=False)
    own = torch.nn.functional.cross_entropy(up, labels, ignore_index=255)
    torch.testing.assert_close(out.loss.detach(), own.detach() + extra, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    head = base.decode_head.classifier
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    model.eval()
    with torch.no_grad():
        assert model(pixel_values=images).logits.shape == (2, 5, 8, 8)


def test_upernet_main_and_auxiliary_heads():
    base = _upernet()
    model = AdaptiveSegmentationModel(base, ContextAwareClassifier, include_aux=True)
    assert isinstance(base.decode_head.classifier, ContextAwareClassifier)
    assert isinstance(base.auxiliary_head.classifier, ContextAwareClassifier)
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    out = model(pixel_values=images, labels=labels)
    assert {"decode_head.classifier.distill", "auxiliary_head.classifier.distill"} <= set(model.last_losses)
    out.loss.backward()
    assert base.auxiliary_head.classifier.apd_proj[0].weight.grad is not None


def test_wrapper_requires_a_head():
    with pytest.raises(ValueError, match="no adaptive head"):
        AdaptiveSegmentationModel(_segformer())
