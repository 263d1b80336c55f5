"""Sliding-window inference with whole-image context.

Large images are segmented in overlapping tiles. CAC and SSA-Seg build their classifier from the image they are
shown, so under plain tiling every tile gets a classifier of its own, built from a fraction of the scene.
:func:`slide_inference` follows mmseg's slide mode and offers, besides the plain behaviour (``context="tile"``),
the classifier built from the whole image (``context="image"``), at the cost of a second pass of the model over
the tiles.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_choice
from .head import AdaptiveHead

__all__ = ["slide_inference", "tile_grid"]

#: a tile: ``(y1, y2, x1, x2)`` rows and columns of the image
Tile = tuple[int, int, int, int]


class ContextHead(Protocol):
    """What a head offers to build its classifier from the whole image (CAC and SSA-Seg do)."""

    num_classes: int
    _context_collector: Any

    def context_statistics(self, feat: Tensor, pixel_weight: Tensor | None = None) -> dict[str, Tensor]: ...

    def merge_context(self, first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def logits_from_context(self, feat: Tensor, context: dict[str, Tensor]) -> Tensor: ...


def tile_grid(height: int, width: int, crop_size: tuple[int, int], stride: tuple[int, int]) -> list[Tile]:
    """mmseg's slide grid: ``max(H − h_crop + h_stride − 1, 0) // h_stride + 1`` rows of tiles (and the same for
    columns); the last row and column are shifted back to end at the image border, and an image smaller than the
    crop is one tile of its own size.

    Example:
        >>> tile_grid(10, 25, crop_size=(10, 10), stride=(10, 10))  # the last column shifted back to the border
        [(0, 10, 0, 10), (0, 10, 10, 20), (0, 10, 15, 25)]
    """
    _check_stride(crop_size, stride)
    (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
    rows = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    cols = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    tiles = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * h_stride + h_crop, height), min(c * w_stride + w_crop, width)
            tiles.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return tiles


def _check_stride(crop_size: tuple[int, int], stride: tuple[int, int]) -> None:
    """A stride longer than the crop leaves the pixels between two tiles in no tile (their logits 0/0)."""
    if stride[0] > crop_size[0] or stride[1] > crop_size[1]:
        raise ValueError(
            f"stride {stride} is longer than crop_size {crop_size} (h, w): the pixels between neighbouring tiles "
            "would lie in no tile; use stride <= crop_size"
        )


def _pair(value: int | tuple[int, int], name: str, minimum: int = 1) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        kind = "a positive int" if minimum > 0 else "a non-negative int"
        raise ValueError(f"{name} must be {kind} or a pair (h, w) of them, got {value!r}")
    return pair


def _model_logits(output: Any) -> Tensor:
    """The segmentation logits in a model's output: a tensor, ``output["out"]`` (torchvision) or ``.logits`` (HF)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "out" in output:
        return output["out"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}")


def _resize(logits: Tensor, size: tuple[int, int], align_corners: bool) -> Tensor:
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


class _Stitcher:
    """Sums tile logits into the image and divides by the number of tiles covering each pixel (mmseg)."""

    def __init__(self, images: Tensor, tiles: list[Tile]) -> None:
        b, _, h, w = images.shape
        self.shape, self.device = (b, h, w), images.device
        self.preds: Tensor | None = None
        self.count = _coverage(images, tiles)

    def add(self, tile: Tile, logits: Tensor) -> None:
        y1, y2, x1, x2 = tile
        if self.preds is None:
            b, h, w = self.shape
            dtype = torch.promote_types(logits.dtype, torch.float32)
            self.preds = logits.new_zeros(b, logits.shape[1], h, w, dtype=dtype)
        self.preds[..., y1:y2, x1:x2] += logits

    def result(self) -> Tensor:
        if self.preds is None:
            raise ValueError("no tile was added")
        return self.preds / self.count


def _coverage(images: Tensor, tiles: list[Tile]) -> Tensor:
    """How many of ``tiles`` cover each pixel of ``images``: ``[1, 1, H, W]``."""
    count = torch.zeros(1, 1, *images.shape[-2:], device=images.device)
    for y1, y2, x1, x2 in tiles:
        count[..., y1:y2, x1:x2] += 1
    return count


def _cores(images: Tensor, tiles: list[Tile], margin: tuple[int, int]) -> list[Tile]:
    """Each tile less ``margin`` pixels at every edge it shares with the inside of the image (every pixel stays in
    some core where ``margin`` is at most half the overlap of neighbouring tiles)."""
    h, w = images.shape[-2:]
    my, mx = margin
    return [
        (y1 + my if y1 > 0 else 0, y2 - my if y2 < h else h, x1 + mx if x1 > 0 else 0, x2 - mx if x2 < w else w)
        for y1, y2, x1, x2 in tiles
    ]


class _ContextCollector:
    """Both passes of ``context="image"``. Pass 1 (:attr:`context` is being built): while the model runs on a tile,
    the head merges its image statistics, each pixel of the tile's core weighted by ``1/coverage`` over the cores
    (the rest of the tile by 0), and returns zeros (the model output is unused). Pass 2 (:attr:`apply` set): the
    head classifies the tile with the classifier built from the whole image, and the model does with those logits
    whatever it does after its classifier (upsampling, an activation)."""

    def __init__(self, head: ContextHead, core_count: Tensor) -> None:
        self._head = weakref.ref(head)  # weak: the collector is the value of its head's entry in _COLLECTORS
        self.start(core_count)

    @property
    def head(self) -> ContextHead:
        head = self._head()
        if head is None:
            raise RuntimeError("the head of this slide_inference() call was deleted")
        return head

    @classmethod
    def of(cls, head: ContextHead, core_count: Tensor) -> _ContextCollector:
        """The head's collector, started for an image: one object per head, reused by every call, so that a
        compiled model meets the same object at its head each time (dynamo may guard on its identity)."""
        collector = _COLLECTORS.get(head)
        if collector is None:
            collector = _COLLECTORS[head] = cls(head, core_count)
        return collector.start(core_count)

    def start(self, core_count: Tensor) -> _ContextCollector:
        self.image_weight = torch.where(core_count > 0, 1.0 / core_count.clamp_min(1), 0.0)
        self.tile: Tile | None = None
        self.core: Tile | None = None
        self.calls = 0
        self.apply = False
        self.context: dict[str, Tensor] | None = None
        return self

    @torch.compiler.disable
    def collect(self, feat: Tensor) -> Tensor:
        self.calls += 1
        if self.apply:
            return self.head.logits_from_context(feat, cast(dict[str, Tensor], self.context))
        y1, y2, x1, x2 = self.tile  # type: ignore[misc]
        c1, c2, d1, d2 = self.core  # type: ignore[misc]
        inverse = torch.zeros_like(self.image_weight[..., y1:y2, x1:x2])
        inverse[..., c1 - y1 : c2 - y1, d1 - x1 : d2 - x1] = self.image_weight[..., c1:c2, d1:d2]
        weight = (
            inverse if inverse.shape[-2:] == feat.shape[-2:] else F.interpolate(inverse, feat.shape[-2:], mode="area")
        )
        stats = self.head.context_statistics(feat, weight)
        self.context = stats if self.context is None else self.head.merge_context(self.context, stats)
        return feat.new_zeros(feat.shape[0], self.head.num_classes, *feat.shape[-2:])

    def __enter__(self) -> _ContextCollector:
        if self.head._context_collector is not None:
            raise RuntimeError("slide_inference() calls cannot be nested on the same head")
        self.head._context_collector = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.head._context_collector = None
        self.image_weight, self.context = self.image_weight.new_empty(0), None  # the image's tensors go


#: each head's collector (weak keys, and the collector refers to its head weakly: it goes with its head)
_COLLECTORS: weakref.WeakKeyDictionary[Any, _ContextCollector] = weakref.WeakKeyDictionary()


def _recorded_main_head(model: nn.Module) -> tuple[list[str], str | None] | None:
    """Where :func:`replace_classifier` recorded its paths: on ``model`` or on the outermost module inside it that
    carries them (the HF model inside :class:`~adaptive_heads.integrations.hf.AdaptiveSegmentationModel`, a model
    inside a Lightning module): ``(the replaced paths, the main head's path)`` from ``model``, or ``None`` where
    none (or several side by side) recorded them."""
    owners: list[tuple[str, list[str], str | None]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{owner}.") for owner, _, _ in owners if owner):
            continue  # inside a recording module already found
        paths = getattr(module, "adaptive_head_paths", None)
        if paths:
            owners.append((name, list(paths), getattr(module, "adaptive_main_head", paths[0])))
            if not name:
                break  # the model itself
    if len(owners) != 1:
        return None
    prefix, paths, main = owners[0]

    def full(path: str) -> str:
        return f"{prefix}.{path}" if prefix else path

    return [full(p) for p in paths], None if main is None else full(main)


def _context_head(model: nn.Module, head: str | None) -> ContextHead | None:
    """The head whose logits the model returns: ``head`` (a path), the main head :func:`replace_classifier`
    recorded (on the model or on the model inside a wrapper), or the model's only adaptive head; ``None`` if it
    builds no image context (ProtoSeg)."""
    if head is not None:
        found = model.get_submodule(head)
    else:
        heads = {name: m for name, m in model.named_modules() if isinstance(m, AdaptiveHead)}
        if isinstance(model, AdaptiveHead):
            heads = {"": model}
        recorded = _recorded_main_head(model)
        if recorded is not None and recorded[1] is None:
            raise ValueError(
                f"the model's main classifier is not an adaptive head (replaced: {recorded[0]}); image context "
                'builds the classifier of the main head: replace it, pass head=, or use context="tile"'
            )
        if recorded is not None:
            found = model.get_submodule(cast(str, recorded[1]))
        elif len(heads) == 1:
            found = next(iter(heads.values()))
        elif not heads:
            raise ValueError('context="image" needs an adaptive head in the model; use context="tile"')
        else:
            raise ValueError(f"the model has several adaptive heads {sorted(heads)}; pass head= (the main one's path)")
    if not isinstance(found, AdaptiveHead):
        raise TypeError(f"head= must name an AdaptiveHead, got {type(found).__name__}")
    return cast(ContextHead, found) if hasattr(found, "context_statistics") else None


def _tiles(images: Tensor, tiles: list[Tile]) -> Iterator[tuple[Tile, Tensor]]:
    """Each tile and its pixels, copied to a dense tensor in the images' memory format: every tile of every image
    has the same strides, so a compiled model meets no new input layout (a view of the image would carry the
    image's strides, and torch.compile guards on them)."""
    channels_last = not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for tile in tiles:
        y1, y2, x1, x2 = tile
        yield tile, images[..., y1:y2, x1:x2].contiguous(memory_format=layout)


@torch.no_grad()
def slide_inference(
    model: nn.Module,
    images: Tensor,
    crop_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    *,
    context: Literal["image", "tile"] = "tile",
    head: str | None = None,
    align_corners: bool = False,
    forward: Callable[[Tensor], Any] | None = None,
    context_margin: int | tuple[int, int] | None = None,
) -> Tensor:
    """Segment ``images`` tile by tile, as mmseg's ``test_cfg=dict(mode="slide")`` does, with image context.

    The tile grid is mmseg's (:func:`tile_grid`); each pixel's logits are the average over the tiles covering it.

    - ``context="tile"``: exactly mmseg's slide inference, for any model: the model runs on every tile and its
      logits (a tensor, ``out["out"]`` or ``out.logits``, resized bilinearly to the tile if smaller) are stitched.
      An adaptive head then builds its classifier from each tile alone.
    - ``context="image"``: two passes of the model over the tiles. Pass 1 merges the head's image statistics
      over the tiles (CAC: soft class sums and areas; SSA-Seg: the same and its pixel-softmax spatial pooling as
      a running log-sum-exp). Each pixel counts once: the statistics come from each tile's core, the tile less
      ``context_margin`` pixels at every edge it shares with a neighbouring tile (features there see the tile's
      zero padding, not the neighbour), each pixel weighted by ``1/coverage`` over the cores. Pass 2 runs the
      model again on every tile with its head classifying by the classifier built from the whole image, so
      whatever the model does after its classifier (smp's upsampling and activation, HF DPT's upsampling,
      mmseg's resize) applies as in a plain forward; the tiles' outputs are stitched as in ``"tile"`` mode.
      Twice the time of ``"tile"``; the memory of one tile's forward. ProtoSeg has no image context (its
      prototypes are global): both modes give the same result, and ``"image"`` runs as ``"tile"``.

    Exactness: one tile covering the image equals the plain forward; with features that depend on their own
    pixel only, ``"image"`` equals whole-image inference for any grid (tested to 1e-5 for CAC and for SSA-Seg
    with a 1×1 position kernel). SSA-Seg's position features are a 3×3 depthwise conv of each tile's features:
    pixels within one feature pixel of a tile border see the tile's zero padding instead of the neighbouring
    tile (as in tile mode, and as every convolution of the backbone does under tiling), and their share of the
    spatial statistics moves the image's classifier slightly.

    Args:
        model: a segmentation model in eval mode returning logits for its input (any size).
        images: ``[B, 3, H, W]``.
        crop_size: tile size ``(h, w)`` or an int.
        stride: step between tiles ``(h, w)`` or an int, at most ``crop_size`` (a longer step leaves pixels in
            no tile: ``ValueError``).
        context: ``"tile"`` (default: the official heads' behaviour under mmseg's slide inference) or
            ``"image"``. The classifier built from a tile also adapts to the tile's own features, which tiling
            shifts (how the two compare on CamVid: docs, Large images).
        head: path of the adaptive head whose logits the model returns (default: the main head recorded by
            :func:`~adaptive_heads.replace_classifier`, the first of ``model.adaptive_head_paths``, also where it
            was recorded on a model inside a wrapper such as HF's ``AdaptiveSegmentationModel``, or the model's
            only adaptive head).
        align_corners: of the bilinear resize of logits to the tile.
        forward: how to run the model on a tile (default ``model(tile)``); e.g. mmseg's ``encode_decode`` with
            the tile's metadata.
        context_margin: ``(h, w)`` or an int: image pixels at the inner edges of each tile left out of the image
            statistics (``context="image"``). Default: half the overlap of neighbouring tiles,
            ``(crop − stride) // 2``, the most that leaves every pixel in some tile's core; 0 counts every tile
            pixel with weight ``1/coverage``. Any margin gives the exact image statistics for pixel-local
            features.

    Returns:
        ``[B, n, H, W]`` logits (float32 or wider).

    Example:
        >>> from adaptive_heads import ContextAwareClassifier
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), ContextAwareClassifier(8, 4)).eval()
        >>> slide_inference(model, torch.randn(1, 3, 40, 50), crop_size=24, stride=16).shape
        torch.Size([1, 4, 40, 50])
    """
    check_choice("context", context, ("image", "tile"))
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    if getattr(model, "_orig_mod", model).training:  # torch.compile's wrapper keeps a training flag of its own (2.4)
        raise ValueError("slide_inference needs the model in eval mode (model.eval())")
    crop, step = _pair(crop_size, "crop_size"), _pair(stride, "stride")
    _check_stride(crop, step)
    widest = (max((crop[0] - step[0]) // 2, 0), max((crop[1] - step[1]) // 2, 0))
    margin = widest if context_margin is None else _pair(context_margin, "context_margin", minimum=0)
    if margin[0] > widest[0] or margin[1] > widest[1]:
        raise ValueError(
            "context_margin must be at most half the overlap of neighbouring tiles, (crop_size - stride) // 2 = "
            f"{widest}, so that every pixel lies in some tile's core; got {margin}"
        )
    tiles = tile_grid(images.shape[-2], images.shape[-1], crop, step)
    stitcher = _Stitcher(images, tiles)
    run = model if forward is None else forward
    context_head = _context_head(model, head) if context == "image" else None
    if context_head is None:
        for tile, crop_images in _tiles(images, tiles):
            logits = _model_logits(run(crop_images))
            stitcher.add(tile, _resize(logits, (crop_images.shape[-2], crop_images.shape[-1]), align_corners))
        return stitcher.result()
    cores = _cores(images, tiles, margin)
    collector = _ContextCollector.of(context_head, _coverage(images, cores))
    with collector:
        for (tile, crop_images), core in zip(_tiles(images, tiles), cores, strict=True):
            collector.tile, collector.core = tile, core
            run(crop_images)
        if collector.calls != len(tiles):
            raise RuntimeError(
                f"the head {type(context_head).__name__} ran {collector.calls} times for {len(tiles)} tiles; "
                "pass head= to name the one whose logits the model returns"
            )
        collector.apply = True
        for tile, crop_images in _tiles(images, tiles):
            logits = _model_logits(run(crop_images))
            stitcher.add(tile, _resize(logits, (crop_images.shape[-2], crop_images.shape[-1]), align_corners))
    return stitcher.result()
