"""Find the final pixel classifier of a segmentation model and swap it for an adaptive head."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import AdaptiveHead

__all__ = ["KNOWN_CLASSIFIER_PATHS", "find_classifier", "replace_classifier"]

# model class name -> its (main classifier path, auxiliary classifier path or None) candidates, tried in order
# (a class name can mean two libraries' models: torchvision's and smp's DeepLabV3)
KNOWN_CLASSIFIER_PATHS: dict[str, list[tuple[str, str | None]]] = {
    # torchvision
    "FCN": [("classifier.4", "aux_classifier.4")],
    "DeepLabV3": [("classifier.4", "aux_classifier.4"), ("segmentation_head.0", None)],  # torchvision, smp
    # HF transformers
    "SegformerForSemanticSegmentation": [("decode_head.classifier", None)],
    "UperNetForSemanticSegmentation": [("decode_head.classifier", "auxiliary_head.classifier")],
    "BeitForSemanticSegmentation": [("decode_head.classifier", "auxiliary_head.classifier")],
    "Data2VecVisionForSemanticSegmentation": [("decode_head.classifier", "auxiliary_head.classifier")],
    "DPTForSemanticSegmentation": [("head.head.4", "auxiliary_head.head.4")],
    "MobileViTForSemanticSegmentation": [("segmentation_head.classifier.convolution", None)],
    "MobileViTV2ForSemanticSegmentation": [("segmentation_head.classifier.convolution", None)],
    "MobileNetV2ForSemanticSegmentation": [("segmentation_head.classifier.convolution", None)],
    # segmentation_models_pytorch
    "Unet": [("segmentation_head.0", None)],
    "UnetPlusPlus": [("segmentation_head.0", None)],
    "MAnet": [("segmentation_head.0", None)],
    "PAN": [("segmentation_head.0", None)],
    "PSPNet": [("segmentation_head.0", None)],
    "FPN": [("segmentation_head.0", None)],
    "DeepLabV3Plus": [("segmentation_head.0", None)],
    "Linknet": [("segmentation_head.0", None)],
    "Segformer": [("segmentation_head.0", None)],
    "UPerNet": [("segmentation_head.0", None)],
    "DPT": [("segmentation_head.head.4", None)],
    # mmseg 1.x
    "EncoderDecoder": [("decode_head.conv_seg", "auxiliary_head.conv_seg")],
}

# models whose prediction is a sum of several classifiers: we refuse to guess
_SUMMED_CLASSIFIERS = {"LRASPP": ("classifier.low_classifier", "classifier.high_classifier")}

HeadFactory = Callable[[int, int], AdaptiveHead]


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _infer_num_classes(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for owner, attr in ((config, "num_labels"), (model, "num_classes")):
        value = getattr(owner, attr, None) if owner is not None else None
        if isinstance(value, int):
            return value
    return None


def _cascade_path(model: nn.Module) -> str | None:
    heads = getattr(model, "decode_head", None)
    if isinstance(heads, nn.ModuleList) and len(heads) > 0:
        return f"decode_head.{len(heads) - 1}.conv_seg"
    return None


def find_classifier(model: nn.Module, num_classes: int | None = None, include_aux: bool = False) -> list[str]:
    """Paths of the classifier convs of ``model`` (the main one first, then the auxiliary one if asked).

    Known model classes are looked up in :data:`KNOWN_CLASSIFIER_PATHS`; otherwise the last ``nn.Conv2d``
    in ``named_modules()`` order with ``out_channels == num_classes`` is taken.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 5, 1))
        >>> find_classifier(model, num_classes=5)
        ['1']
    """
    name = type(model).__name__
    if name in _SUMMED_CLASSIFIERS:
        low, high = _SUMMED_CLASSIFIERS[name]
        raise ValueError(
            f"{name} sums two classifier convs ({low!r} and {high!r}); pass path= to say which one to replace"
        )
    cascade = _cascade_path(model)
    if cascade is not None and _get(model, cascade) is not None:
        return [cascade]
    for main, aux in KNOWN_CLASSIFIER_PATHS.get(name, []):
        if _get(model, main) is not None:
            paths = [main]
            if include_aux and aux is not None and _get(model, aux) is not None:
                paths.append(aux)
            return paths
    num_classes = num_classes if num_classes is not None else _infer_num_classes(model)
    if num_classes is None:
        raise ValueError(
            f"cannot locate the classifier of {name}: it is not a known model class and num_classes is "
            "unknown; pass num_classes= or path="
        )
    matches = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, AdaptiveHead)) and m.out_channels == num_classes
    ]
    if not matches:
        raise ValueError(f"no nn.Conv2d with out_channels={num_classes} found in {name}; pass path=")
    return [matches[-1]]


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def _check_classifier_geometry(path: str, conv: nn.Conv2d) -> None:
    """The classifier must map each pixel to its own logits at the same size: stride 1, no groups, padding that
    keeps the size (a 1×1 conv, or a k×k conv padded by ``dilation·(k − 1)/2``)."""
    k, pad, dil = conv.kernel_size, conv.padding, conv.dilation
    same = pad == "same" or (
        not isinstance(pad, str) and all(2 * p == d * (kk - 1) for p, d, kk in zip(pad, dil, k, strict=False))
    )
    if conv.groups != 1 or conv.stride != (1, 1) or not same:
        raise ValueError(
            f"{path!r} is a {k[0]}×{k[1]} conv with stride {conv.stride}, padding {pad!r}, groups {conv.groups}; "
            "adaptive heads replace a classifier whose logits keep the feature map's size (stride 1, groups 1, "
            "padding dilation·(k − 1)/2). Pass path= to the right conv."
        )


def replace_classifier(
    model: nn.Module,
    head_factory: HeadFactory,
    path: str | list[str] | None = None,
    *,
    num_classes: int | None = None,
    include_aux: bool = False,
    copy_weights: bool = True,
) -> nn.Module:
    """Swap the final classifier conv of ``model`` for ``head_factory(in_channels, num_classes)`` in place.

    Args:
        model: the segmentation model.
        head_factory: e.g. ``ContextAwareClassifier`` or ``functools.partial(ContextAwareClassifier, tau=10)``.
        path: the dotted path(s) of the conv(s) to replace; default: found by :func:`find_classifier`.
        num_classes: for the fallback search when the model class is not known.
        include_aux: also replace the known auxiliary classifier.
        copy_weights: copy the original conv's weight and bias (1×1 or k×k) into the new head's coarse classifier
            (:meth:`~adaptive_heads.base.AdaptiveHead.adopt_classifier`).

    Returns:
        ``model`` (modified in place); the replaced paths are in ``model.adaptive_head_paths``.

    Example:
        >>> from adaptive_heads import ContextAwareClassifier
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 5, 1))
        >>> model = replace_classifier(model, ContextAwareClassifier, num_classes=5)
        >>> model.adaptive_head_paths, type(model[1]).__name__
        (['1'], 'ContextAwareClassifier')
    """
    paths = (
        [path]
        if isinstance(path, str)
        else list(path)
        if path is not None
        else find_classifier(model, num_classes, include_aux)
    )
    for p in paths:
        old = _get(model, p)
        if old is None:
            raise ValueError(f"{type(model).__name__} has no submodule {p!r}")
        if isinstance(old, AdaptiveHead):
            raise ValueError(f"{p!r} is already an adaptive head ({type(old).__name__})")
        if not isinstance(old, nn.Conv2d):
            raise TypeError(f"{p!r} is a {type(old).__name__}, expected the classifier nn.Conv2d")
        _check_classifier_geometry(p, old)
        head = head_factory(old.in_channels, old.out_channels)
        if not isinstance(head, AdaptiveHead):
            raise TypeError(f"head_factory must return an AdaptiveHead, got {type(head).__name__}")
        param = old.weight
        head.to(device=param.device, dtype=param.dtype)
        head.adopt_classifier(old, copy_weights)
        head.train(old.training)
        _set(model, p, head)
    model.adaptive_head_paths = paths  # type: ignore[assignment]
    return model
