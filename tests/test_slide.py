"""Sliding-window inference: mmseg's tile semantics, and whole-image context for CAC and SSA-Seg."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptive_heads as ah
from adaptive_heads.slide import tile_grid

from .conftest import make_head
from .models import TinyFCN

CONTEXT_HEADS = ["cac", "ssa"]


class PixelLocal(nn.Module):
    """Features at a pixel depend on that pixel alone (1×1 convs up to the head); logits at input size."""

    def __init__(self, head: nn.Module, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 1), nn.ReLU(), nn.Conv2d(channels, channels, 1))
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))


def pixel_local(name: str, seed: int = 0, **options) -> PixelLocal:
    torch.manual_seed(seed)
    head = make_head(name, 8, 5, **options)
    if name == "ssa":  # position features with a 1×1 footprint: the exact case (see the docstring)
        centre_position_conv(head)
    return PixelLocal(head).eval()


def centre_position_conv(head: nn.Module) -> None:
    """Reduce SSA-Seg's 3×3 depthwise position conv to its centre tap (a 1×1 footprint)."""
    with torch.no_grad():
        centre = head.get_feat_pos.weight[:, :, 1, 1].clone()
        head.get_feat_pos.weight.zero_()
        head.get_feat_pos.weight[:, :, 1, 1] = centre


def reference_tile_mode(model, images, crop, stride):
    """mmseg's ``slide_inference``, written out."""
    b, _, h_img, w_img = images.shape
    (h_crop, w_crop), (h_stride, w_stride) = crop, stride
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds, count = None, torch.zeros(b, 1, h_img, w_img)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            out = model(images[:, :, y1:y2, x1:x2])
            out = out["out"] if isinstance(out, dict) else out
            out = F.interpolate(out, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            pad = F.pad(out, (x1, w_img - x2, y1, h_img - y2))
            preds = pad if preds is None else preds + pad
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def test_tile_grid_is_mmseg_grid():
    assert tile_grid(10, 10, (10, 10), (5, 5)) == [(0, 10, 0, 10)]
    assert tile_grid(10, 25, (10, 10), (10, 10)) == [(0, 10, 0, 10), (0, 10, 10, 20), (0, 10, 15, 25)]  # last shifted
    assert tile_grid(6, 7, (10, 10), (5, 5)) == [(0, 6, 0, 7)]  # smaller than the crop: one tile of its own size


@pytest.mark.parametrize("context", ["image", "tile"])
def test_one_tile_covering_the_image_equals_the_plain_forward(head_name, context):
    torch.manual_seed(0)
    model = ah.replace_classifier(TinyFCN(num_classes=5, width=8, aux=False), lambda c, n: make_head(head_name, c, n))
    model.eval()
    images = torch.randn(2, 3, 24, 30)
    out = ah.slide_inference(model, images, crop_size=(24, 30), stride=8, context=context)
    torch.testing.assert_close(out, model(images)["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONTEXT_HEADS)
@pytest.mark.parametrize(("crop", "stride"), [((16, 16), (16, 16)), ((16, 20), (10, 12)), ((13, 17), (7, 5))])
def test_image_context_equals_whole_image_inference_for_pixel_local_features(name, crop, stride):
    model = pixel_local(name)
    images = torch.randn(3, 3, 37, 45)  # several images, odd sizes
    whole = model(images)
    out = ah.slide_inference(model, images, crop, stride, context="image")
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)
    tiled = ah.slide_inference(model, images, crop, stride, context="tile")
    assert (tiled - whole).abs().max() > 1e-2  # per-tile classifiers really differ from the image's


@pytest.mark.parametrize("margin", [0, 2, (3, 1)])
def test_any_context_margin_is_exact_for_pixel_local_features(margin):
    model = pixel_local("cac")
    images = torch.randn(2, 3, 37, 45)
    out = ah.slide_inference(model, images, (16, 20), (10, 12), context="image", context_margin=margin)
    torch.testing.assert_close(out, model(images), rtol=1e-5, atol=1e-5)


class ThreeByThreeStem(nn.Module):
    """A 3×3 zero-padded conv before the head: features within one pixel of a tile edge see the tile's padding."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x))


@pytest.mark.parametrize("name", CONTEXT_HEADS)
def test_context_margin_keeps_the_tile_padding_out_of_the_image_statistics(name):
    """A margin at least the receptive-field radius (1 here) gives exactly the whole image's statistics, so every
    pixel that no tile sees within one pixel of an inner edge gets the whole image's logits; margin 0 does not."""
    torch.manual_seed(0)
    head = make_head(name, 8, 5)
    if name == "ssa":  # its own 3x3 position conv would add a second footprint: keep the stem's only
        centre_position_conv(head)
    model = ThreeByThreeStem(head).eval()
    images = torch.randn(1, 3, 32, 40)
    crop, stride = (16, 20), (8, 10)  # overlap 8 x 10: default margin (4, 5)
    whole = model(images)
    clean = torch.ones(32, 40, dtype=torch.bool)  # pixels at least 2 px inside every tile covering them
    for y1, y2, x1, x2 in tile_grid(32, 40, crop, stride):
        inner = torch.zeros(32, 40, dtype=torch.bool)
        inner[
            y1 + (2 if y1 > 0 else 0) : y2 - (2 if y2 < 32 else 0),
            x1 + (2 if x1 > 0 else 0) : x2 - (2 if x2 < 40 else 0),
        ] = True
        tile = torch.zeros_like(inner)
        tile[y1:y2, x1:x2] = True
        clean &= inner | ~tile
    assert clean.float().mean() > 0.2
    cored = ah.slide_inference(model, images, crop, stride, context="image")
    torch.testing.assert_close(cored[..., clean], whole[..., clean], rtol=1e-5, atol=1e-5)
    every_pixel = ah.slide_inference(model, images, crop, stride, context="image", context_margin=0)
    assert (every_pixel[..., clean] - whole[..., clean]).abs().max() > 1e-3


def test_ssa_three_by_three_position_conv_sees_the_tile_padding_at_the_seams():
    """The documented limit of SSA's exactness: its position features are a 3×3 conv of each tile's features."""
    torch.manual_seed(0)
    model = PixelLocal(make_head("ssa", 8, 5)).eval()  # the real 3×3 depthwise position conv
    images = torch.randn(1, 3, 32, 32)
    whole = model(images)
    diff = (ah.slide_inference(model, images, (16, 16), (16, 16), context="image") - whole).abs().amax(dim=(0, 1))
    seams = torch.zeros(32, 32, dtype=torch.bool)
    seams[15:17, :] = seams[:, 15:17] = True  # one pixel on either side of the tile seams
    assert diff[seams].max() > 1.0  # the tile's zero padding, as in tile mode
    assert diff[~seams].max() < 0.1  # elsewhere only through the seam pixels' share of the image statistics


@pytest.mark.parametrize("name", ["cac", "ssa", "proto"])
@pytest.mark.parametrize(("crop", "stride"), [((16, 16), (8, 8)), ((20, 12), (20, 12))])
def test_tile_context_equals_the_reference_loop(name, crop, stride):
    torch.manual_seed(0)
    model = ah.replace_classifier(TinyFCN(num_classes=5, width=8, aux=False), lambda c, n: make_head(name, c, n))
    model.eval()
    images = torch.randn(2, 3, 33, 41)
    out = ah.slide_inference(model, images, crop, stride, context="tile")
    torch.testing.assert_close(out, reference_tile_mode(model, images, crop, stride), rtol=1e-5, atol=1e-6)


def test_protoseg_has_no_image_context_both_modes_agree():
    torch.manual_seed(0)
    model = PixelLocal(make_head("proto", 8, 5)).eval()
    images = torch.randn(2, 3, 30, 30)
    image = ah.slide_inference(model, images, 16, 8, context="image")
    torch.testing.assert_close(image, ah.slide_inference(model, images, 16, 8, context="tile"), rtol=0, atol=0)
    torch.testing.assert_close(image, model(images), rtol=1e-5, atol=1e-5)  # and pixel-local: equal to whole


def test_model_with_an_auxiliary_adaptive_head():
    torch.manual_seed(0)
    model = ah.replace_classifier(TinyFCN(num_classes=5, width=8), ah.ContextAwareClassifier, include_aux=True)
    model.eval()
    images = torch.randn(1, 3, 40, 40)
    out = ah.slide_inference(model, images, 24, 16, context="image")  # the main head (first recorded path)
    assert out.shape == (1, 5, 40, 40) and torch.isfinite(out).all()
    whole = ah.slide_inference(model, images, 40, 16)
    torch.testing.assert_close(whole, model(images)["out"], rtol=1e-5, atol=1e-5)
    del model.adaptive_head_paths
    with pytest.raises(ValueError, match=r"several adaptive heads .* pass head="):
        ah.slide_inference(model, images, 24, 16, context="image")
    named = ah.slide_inference(model, images, 24, 16, context="image", head="classifier.4")
    torch.testing.assert_close(named, out)


def test_hf_style_output_with_low_resolution_logits():
    class HFLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.classifier = ah.ContextAwareClassifier(8, 4)

        def forward(self, pixel_values):
            feat = F.avg_pool2d(self.stem(pixel_values), 4)
            return SimpleNamespace(logits=self.classifier(feat))  # logits at 1/4 resolution, like HF models

    torch.manual_seed(0)
    model = HFLike().eval()
    images = torch.randn(1, 3, 32, 48)
    whole = F.interpolate(model(images).logits, size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ah.slide_inference(model, images, (32, 48), 16, context="tile"), whole)
    torch.testing.assert_close(ah.slide_inference(model, images, (32, 48), 16, context="image"), whole)


@pytest.mark.parametrize("name", CONTEXT_HEADS)
def test_bfloat16_model(name):
    model = pixel_local(name).bfloat16()
    images = torch.randn(1, 3, 30, 34, dtype=torch.bfloat16)
    out = ah.slide_inference(model, images, 16, 12, context="image")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    whole = model(images).float()
    assert (out - whole).abs().max() < 0.5  # bf16 rounding of tile features against the whole-image pass


def test_errors():
    model = pixel_local("cac")
    images = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="context must be 'image' or 'tile'"):
        ah.slide_inference(model, images, 8, 8, context="crop")
    with pytest.raises(ValueError, match="crop_size must be a positive int or a pair"):
        ah.slide_inference(model, images, 0, 8)
    with pytest.raises(ValueError, match="context_margin must be a non-negative int or a pair"):
        ah.slide_inference(model, images, 8, 6, context_margin=-1)
    with pytest.raises(ValueError, match=r"context_margin must be at most half the overlap .* = \(1, 1\)"):
        ah.slide_inference(model, images, 8, 6, context_margin=2)
    with pytest.raises(ValueError, match="images must be a \\[B, C, H, W\\] tensor"):
        ah.slide_inference(model, images[0], 8, 8)
    with pytest.raises(ValueError, match="eval mode"):
        ah.slide_inference(model.train(), images, 8, 8)
    for context in ("tile", "image"):  # pixels between the tiles would lie in no tile (NaN logits)
        with pytest.raises(ValueError, match=r"stride \(10, 6\) is longer than crop_size \(8, 8\)"):
            ah.slide_inference(model.eval(), images, 8, (10, 6), context=context)
    with pytest.raises(ValueError, match=r"stride \(5, 9\) is longer than crop_size \(8, 8\)"):
        tile_grid(16, 16, (8, 8), (5, 9))
    plain = nn.Conv2d(3, 4, 1).eval()
    with pytest.raises(ValueError, match='needs an adaptive head in the model; use context="tile"'):
        ah.slide_inference(plain, images, 8, 8, context="image")
    assert ah.slide_inference(plain, images, 8, 8).shape == (1, 4, 16, 16)  # default: tile context, any model
