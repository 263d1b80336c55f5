"""mmseg 1.x: adaptive variants of mmseg's decode heads, registered in ``mmseg.registry.MODELS``.

Every per-pixel mmseg head ends in ``cls_seg(feat) = conv_seg(dropout(feat))``. ``Adaptive<Head>`` (for example
``AdaptiveUPerHead``, ``AdaptiveFCNHead``, ``AdaptiveSegformerHead``, ``AdaptiveOCRHead``) is the same head with
``conv_seg`` replaced by an adaptive classifier and a ``loss`` that passes the ground truth to it and adds its
extra terms as ``loss_adaptive`` (the other terms are logged as ``adaptive.<term>``). Enable it in a config with
a few lines::

    custom_imports = dict(imports=["adaptive_heads.integrations.mmseg"], allow_failed_imports=False)
    model = dict(
        decode_head=dict(
            type="AdaptiveUPerHead",                                   # was "UPerHead"
            adaptive=dict(type="ContextAwareClassifier", tau=15.0),    # or SSAClassifier, PrototypeClassifier
            adaptive_loss_weights=None,                                # e.g. dict(distill=1.0)
            # ... the UPerHead arguments as before
        )
    )

Sliding-window inference with whole-image context: use the segmentor ``AdaptiveEncoderDecoder`` (an
``EncoderDecoder``) with ``test_cfg=dict(mode="slide", crop_size=..., stride=..., context="image")``: each image's
adaptive classifier is built from all of its tiles (:func:`adaptive_heads.slide_inference`); ``context="tile"``
is mmseg's own per-tile behaviour. mmseg's plain ``EncoderDecoder`` would ignore ``context``: an ``Adaptive<Head>``
under it refuses ``context="image"`` (``ValueError``).

``loss_adaptive`` is weighted like the head's cross-entropy: by the ``loss_weight`` of the ``CrossEntropyLoss``
in ``loss_decode`` (wherever it is in a list; 0.4 for a usual auxiliary head), or of its only loss (alone or in a
one-entry list, whatever its type); ``adaptive_loss_weight=`` sets it (needed when ``loss_decode`` lists several
losses and no, or several, ``CrossEntropyLoss``).
SSA-Seg's loss has its own dice term: a ``DiceLoss`` in ``loss_decode`` beside it warns (dice counted twice).

On ``mmcv-lite`` (no compiled ops, e.g. on a CPU) the plugin puts :mod:`adaptive_heads.integrations.mmcv_lite`'s
stand-in for mmcv's compiled ops in place before it imports mmseg's models (where the full mmcv is installed it does
nothing), so a config needs only this plugin in ``custom_imports``. A failure to import mmseg's models is raised as
:class:`~adaptive_heads.integrations.PluginImportError`, a ``RuntimeError``: mmengine's ``Config.fromfile`` replaces
every ``ImportError`` of a custom import by its own advice to set ``PYTHONPATH``, which would bury the reason (so a
config's ``allow_failed_imports=True`` does not skip this plugin: without mmseg's models its heads cannot be built
anyway). List the plugin before any other ``custom_imports`` entry that imports mmseg's models.

CAC and SSA-Seg apply their own dropout, at the decode head's ``dropout_ratio`` unless ``adaptive`` sets
``dropout``, to the coarse logits only (as the official heads), so the decode head's outer dropout before
``conv_seg`` is not applied; ProtoSeg keeps it (the official ProtoSeg embeds dropped-out features). The head's
parameters live under ``decode_head.conv_seg.`` (``conv_seg.conv_seg.weight`` is the coarse classifier). mmengine's
``init_weights()`` (called by ``Runner.train()``) calls the head's own
:meth:`~adaptive_heads.head.AdaptiveHead.init_weights`, the official initialisation drawn anew: mmseg's N(0, 0.01²)
and zero bias for the coarse classifier, every other layer as its constructor. The decode head's ``init_cfg``
override of ``conv_seg`` sets that std (``Normal(std=0.5, override=dict(name="conv_seg"))`` gives N(0, 0.5²), as
``adaptive=dict(init_std=0.5)`` does); an override the adaptive head cannot take is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from ..cosine_head import CosineHead
from ..registry import HEADS
from ..replace import mmseg_ce_weight
from ..slide import slide_inference
from ..supervise import supervise
from . import PluginImportError
from .mmcv_lite import install as _install_mmcv_stand_in

try:
    _install_mmcv_stand_in()  # on mmcv-lite a stand-in for mmcv's compiled ops; with the full mmcv nothing
    from mmseg.models import decode_heads as _decode_heads
    from mmseg.models.segmentors import EncoderDecoder
    from mmseg.registry import MODELS
except ImportError as error:
    raise PluginImportError(
        f"adaptive_heads.integrations.mmseg needs mmseg's models, whose import failed: {type(error).__name__}: "
        f"{error}. The plugin works with mmsegmentation 1.x on mmcv 2.0-2.1 (the full mmcv built for your torch and "
        "CUDA, or mmcv-lite, whose missing compiled ops it stands in for); see docs/integrations.md, 'From mmseg'"
    ) from error


__all__ = ["ADAPTIVE_HEADS", "AdaptiveEncoderDecoder", "PluginImportError", "make_adaptive_decode_head"]

#: the heads a config names in ``adaptive=dict(type=...)``, by class name
ADAPTIVE_HEADS = {cls.__name__: cls for cls in HEADS.values()}
_BASES = (
    "FCNHead", "UPerHead", "ASPPHead", "DepthwiseSeparableASPPHead", "PSPHead", "FPNHead", "SegformerHead",
    "OCRHead", "LightHamHead", "DAHead", "DNLHead", "EMAHead", "EncHead", "GCHead", "NLHead", "PSAHead",
)  # fmt: skip


#: mmseg's ``BaseDecodeHead`` init_cfg: N(0, 0.01²) weight and zero bias for ``conv_seg``
_MMSEG_CLASSIFIER_INIT = {"type": "Normal", "std": 0.01, "override": {"name": "conv_seg"}}


def _take_classifier_init(init_cfg, head_cls: type, adaptive: Mapping) -> tuple[object, float | None]:
    """The decode head's ``init_cfg`` without its ``override`` of ``conv_seg``, and the coarse classifier's
    ``init_std`` that override asks for (``None``: the head's own).

    ``conv_seg`` is the adaptive head, whose ``init_weights()`` gives every layer its constructor's init
    (:meth:`~adaptive_heads.head.AdaptiveHead.reset_parameters`): mmengine must not first apply a classifier's init to
    all of it. mmseg's default (``Normal(std=0.01)``) is what the head does anyway; a user's ``Normal`` with mean 0
    and bias 0 becomes the coarse classifier's ``init_std``; anything else is refused with the way that works.
    """
    if not init_cfg:
        return init_cfg, None
    default = init_cfg == _MMSEG_CLASSIFIER_INIT
    kept, std = [], None
    for entry in [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg):
        entry = dict(entry)
        overrides = entry.pop("override", None)
        others = []
        for override in [overrides] if isinstance(overrides, Mapping) else list(overrides or []):
            if override.get("name") != "conv_seg":
                others.append(override)
                continue
            spec = {k: v for k, v in override.items() if k != "name"}
            spec = spec or {k: v for k, v in entry.items() if k != "layer"}  # a bare name: the entry's init
            kind = spec.get("type")
            kind = getattr(kind, "__name__", kind)
            normal = kind in ("Normal", "NormalInit") and spec.get("mean", 0) == 0 and spec.get("bias", 0) == 0
            if default:
                continue  # mmseg's own: the adaptive head's init (adaptive=dict(init_std=...) where it has one)
            if not normal or not issubclass(head_cls, CosineHead):
                what = "CAC's and SSA-Seg's coarse classifier takes a Normal with mean 0 and bias 0 as its init_std"
                raise ValueError(
                    f"init_cfg initialises conv_seg, the adaptive {head_cls.__name__}, with {spec}: its init_weights() "
                    f"gives every layer its constructor's initialisation ({what}; ProtoSeg's prototypes take "
                    "adaptive=dict(init_std=...)). Set the init in adaptive=dict(init_std=...) and drop the override"
                )
            std = float(spec.get("std", 1.0))  # NormalInit's default std
            if "init_std" in adaptive and float(adaptive["init_std"]) != std:
                raise ValueError(
                    f"init_cfg asks for N(0, {std}²) on conv_seg but adaptive sets init_std={adaptive['init_std']}: "
                    "keep one of them"
                )
        if others:
            entry["override"] = others[0] if len(others) == 1 else others
        if others or entry.get("layer") is not None or entry.get("type") == "Pretrained":
            kept.append(entry)  # what still initialises something
    return (kept[0] if len(kept) == 1 else kept or None), std


def make_adaptive_decode_head(base_cls: type) -> type:
    """Subclass of an mmseg decode head whose ``conv_seg`` is an adaptive classifier."""

    class AdaptiveDecodeHead(base_cls):
        def __init__(
            self,
            *args,
            adaptive: Mapping | None = None,
            adaptive_loss_weights: Mapping[str, float] | None = None,
            adaptive_loss_weight: float | None = None,
            **kwargs,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.adaptive_loss_weight = _adaptive_loss_weight(self.loss_decode, adaptive_loss_weight)
            cfg = dict(adaptive or {"type": "ContextAwareClassifier"})
            kind = cfg.pop("type")
            if kind not in ADAPTIVE_HEADS:
                raise ValueError(f"adaptive.type must be one of {list(ADAPTIVE_HEADS)}, got {kind!r}")
            conv: torch.nn.Conv2d = getattr(self, "conv_seg")  # noqa: B009  (the base head's 1×1 classifier)
            head_cls = ADAPTIVE_HEADS[kind]
            if issubclass(head_cls, CosineHead) and "dropout" not in cfg:
                cfg["dropout"] = max(float(self.dropout_ratio), 0.0)  # the decode head's rate (OCR: none)
            init_cfg, init_std = _take_classifier_init(getattr(self, "init_cfg", None), head_cls, cfg)
            self.init_cfg = init_cfg  # BaseModule's
            if init_std is not None:
                cfg["init_std"] = init_std
            head = head_cls(conv.in_channels, conv.out_channels, ignore_index=self.ignore_index, **cfg)
            inner = getattr(head, "conv_seg", None)
            if inner is not None:
                with torch.no_grad():
                    inner.weight.copy_(conv.weight)
                    inner.bias.copy_(conv.bias)
            head.warn_unsupervised = False  # loss() supervises it; mmseg's cascades also run forward() in training
            self.conv_seg = head
            self.adaptive_loss = head.loss_type(ignore_index=self.ignore_index, weights=adaptive_loss_weights)
            _warn_dice_twice(head, self.loss_decode, adaptive_loss_weights)

        def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
            if self.dropout is not None and not isinstance(self.conv_seg, CosineHead):
                feat = self.dropout(feat)  # ProtoSeg: the official head embeds dropped-out features
            return self.conv_seg(feat)

        def predict(self, *args, **kwargs) -> torch.Tensor:
            # BaseDecodeHead.predict(inputs, batch_img_metas, test_cfg); cascade heads add prev_output first
            test_cfg = kwargs["test_cfg"] if "test_cfg" in kwargs else args[-1]
            _check_slide_context(test_cfg, self.reads_slide_context)
            return super().predict(*args, **kwargs)

        def loss(self, *args, **kwargs) -> dict:
            # BaseDecodeHead.loss(inputs, batch_data_samples, train_cfg); cascade heads add prev_output first
            samples = kwargs["batch_data_samples"] if "batch_data_samples" in kwargs else args[-2]
            target = self._stack_batch_gt(samples)  # [B, 1, H, W]
            with supervise(self, target, self.adaptive_loss) as sup:
                losses = super().loss(*args, **kwargs)
                terms = sup.losses()
            losses["loss_adaptive"] = self.adaptive_loss_weight * terms.pop("adaptive_loss")
            losses.update({f"adaptive.{k.split('.', 1)[-1]}": v.detach() for k, v in terms.items()})
            return losses

    #: set by :class:`AdaptiveEncoderDecoder` on its decode head: its segmentor reads ``test_cfg.context``
    AdaptiveDecodeHead.reads_slide_context = False
    AdaptiveDecodeHead.__name__ = AdaptiveDecodeHead.__qualname__ = f"Adaptive{base_cls.__name__}"
    return AdaptiveDecodeHead


def _adaptive_loss_weight(loss_decode: torch.nn.Module, weight: float | None) -> float:
    """The weight of ``loss_adaptive``: ``weight`` if given, else the head's CE weight (``mmseg_ce_weight``)."""
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"adaptive_loss_weight must be a number >= 0 (or None), got {weight!r}")
        return float(weight)
    found = mmseg_ce_weight(loss_decode)
    if found is None:
        names = [type(m).__name__ for m in (loss_decode if isinstance(loss_decode, torch.nn.ModuleList) else [])]
        raise ValueError(
            f"adaptive_loss_weight is needed: loss_decode holds {names}, so the weight of the adaptive terms "
            "(by default the loss_weight of the one CrossEntropyLoss in loss_decode, or of its only loss) is "
            "ambiguous; set adaptive_loss_weight=<float> on the decode head"
        )
    return found


def _warn_dice_twice(head: torch.nn.Module, loss_decode: torch.nn.Module, weights: Mapping | None) -> None:
    """SSA-Seg's loss has a dice term on the logits the head returns; a ``DiceLoss`` in ``loss_decode`` is a second."""
    losses = loss_decode if isinstance(loss_decode, torch.nn.ModuleList) else [loss_decode]
    dice = [type(m).__name__ for m in losses if "Dice" in type(m).__name__]
    if not dice or "dice" not in getattr(head.loss_type, "default_weights", {}) or "dice" in (weights or {}):
        return
    warnings.warn(
        f"{type(head).__name__}'s own loss already has a dice term on the logits the head returns (adaptive.dice, "
        f"weight 1.0, the official SSA-Seg loss); the {dice[0]} in loss_decode counts dice a second time. Remove "
        "it from loss_decode for the official loss, or set adaptive_loss_weights=dict(dice=0.0) to keep only "
        "mmseg's (an explicit dice weight silences this warning)",
        UserWarning,
        stacklevel=4,
    )


def _check_slide_context(test_cfg: Mapping | None, reads_context: bool) -> None:
    """Refuse ``test_cfg.context="image"`` (slide mode) where the segmentor would ignore it."""
    if not test_cfg or test_cfg.get("mode") != "slide":
        return
    context = test_cfg.get("context", "tile")
    if context not in ("tile", "image"):
        raise ValueError(f"test_cfg.context must be 'tile' or 'image', got {context!r}")
    if context == "image" and not reads_context:
        raise ValueError(
            "test_cfg=dict(mode='slide', context='image') is read only by the segmentor AdaptiveEncoderDecoder; "
            "this model's segmentor (e.g. mmseg's EncoderDecoder) would ignore it and classify every tile with "
            "the tile's own context. Set model=dict(type='AdaptiveEncoderDecoder', ...) (same arguments as "
            "EncoderDecoder), or context='tile' for mmseg's per-tile behaviour"
        )


for _name in _BASES:
    _base = getattr(_decode_heads, _name, None)
    if _base is not None and f"Adaptive{_name}" not in MODELS.module_dict:
        MODELS.register_module(name=f"Adaptive{_name}", module=make_adaptive_decode_head(_base))


class AdaptiveEncoderDecoder(EncoderDecoder):
    """``EncoderDecoder`` whose slide inference can build the adaptive head's classifier from the whole image.

    ``test_cfg=dict(mode="slide", crop_size=(h, w), stride=(h, w), context="image")``: the backbone and decode
    head run once per tile (mmseg's grid), the adaptive head's image statistics are merged over the tiles, and
    every tile is classified with the image's classifier (:func:`adaptive_heads.slide_inference`).
    ``context="tile"`` (the default) gives mmseg's own slide inference; ``context_margin`` (default half the
    tiles' overlap) is :func:`adaptive_heads.slide_inference`'s. Other modes are ``EncoderDecoder``'s.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if hasattr(self.decode_head, "reads_slide_context"):  # an Adaptive<Head>: it checks test_cfg.context
            self.decode_head.reads_slide_context = True

    def slide_inference(self, inputs: torch.Tensor, batch_img_metas: list[dict]) -> torch.Tensor:
        cfg = self.test_cfg

        def encode_decode(crop: torch.Tensor) -> torch.Tensor:
            metas = [{**meta, "img_shape": crop.shape[2:]} for meta in batch_img_metas]
            return self.encode_decode(crop, metas)

        return slide_inference(
            self,
            inputs,
            tuple(cfg.crop_size),
            tuple(cfg.stride),
            context=cfg.get("context", "tile"),
            context_margin=cfg.get("context_margin"),
            head="decode_head.conv_seg",
            align_corners=self.align_corners,
            forward=encode_decode,
        )


if "AdaptiveEncoderDecoder" not in MODELS.module_dict:
    MODELS.register_module(name="AdaptiveEncoderDecoder", module=AdaptiveEncoderDecoder)
