"""Find the final pixel classifier of a segmentation model and swap it for an adaptive head."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from .head import AdaptiveHead
from .registry import head_by_name

__all__ = ["KNOWN_CLASSIFIER_PATHS", "find_classifier", "replace_classifier"]

logger = logging.getLogger(__name__)

_SMP_ARCHITECTURES = (
    "Unet", "UnetPlusPlus", "MAnet", "PAN", "PSPNet", "FPN", "DeepLabV3", "DeepLabV3Plus", "Linknet", "Segformer",
    "UPerNet",
)  # fmt: skip

# "<library>.<model class>" -> its (main classifier path, auxiliary classifier path or None) candidates, tried in
# order. A model matches when the class, of that library, is in its MRO (subclasses match too), at any depth of
# the module tree (a model wrapped in a Lightning module or any other wrapper is found with its prefix).
KNOWN_CLASSIFIER_PATHS: dict[str, list[tuple[str, str | None]]] = {
    # torchvision
    "torchvision.FCN": [("classifier.4", "aux_classifier.4")],
    "torchvision.DeepLabV3": [("classifier.4", "aux_classifier.4")],
    # HF transformers
    "transformers.SegformerForSemanticSegmentation": [("decode_head.classifier", None)],
    "transformers.UperNetForSemanticSegmentation": [("decode_head.classifier", "auxiliary_head.classifier")],
    "transformers.BeitForSemanticSegmentation": [("decode_head.classifier", "auxiliary_head.classifier")],
    "transformers.Data2VecVisionForSemanticSegmentation": [("decode_head.classifier", "auxiliary_head.classifier")],
    "transformers.DPTForSemanticSegmentation": [("head.head.4", "auxiliary_head.head.4")],
    "transformers.MobileViTForSemanticSegmentation": [("segmentation_head.classifier.convolution", None)],
    "transformers.MobileViTV2ForSemanticSegmentation": [("segmentation_head.classifier.convolution", None)],
    "transformers.MobileNetV2ForSemanticSegmentation": [("segmentation_head.classifier.convolution", None)],
    # segmentation_models_pytorch
    **{f"segmentation_models_pytorch.{name}": [("segmentation_head.0", None)] for name in _SMP_ARCHITECTURES},
    "segmentation_models_pytorch.DPT": [("segmentation_head.head.4", None)],
    # mmseg 1.x (CascadeEncoderDecoder, a subclass: the last stage of its decode_head list)
    "mmseg.EncoderDecoder": [("decode_head.conv_seg", "auxiliary_head.conv_seg")],
}

# models whose prediction is a sum of several classifiers: we refuse to guess
_SUMMED_CLASSIFIERS = {"torchvision.LRASPP": ("classifier.low_classifier", "classifier.high_classifier")}

# the auxiliary CE weight of the host library's own training recipe, where it is a constant
_AUX_WEIGHTS = {"torchvision": 0.5}

# the dropout each known model applies right before a classifier, and nowhere else: "<library>.<model class>" ->
# {classifier path: dropout path}, relative to the model, read from each library's source (torchvision 0.29,
# transformers 5.24, smp 0.6): tests/integrations swap torchvision's FCN, HF Segformer and smp's FPN, PSPNet and DPT
# in the real libraries. mmseg's decode heads: _mmseg_head_dropout, tested against mmseg's source head by head
_KNOWN_DROPOUTS: dict[str, dict[str, str]] = {
    "torchvision.FCN": {"classifier.4": "classifier.3", "aux_classifier.4": "aux_classifier.3"},
    "torchvision.DeepLabV3": {"aux_classifier.4": "aux_classifier.3"},  # DeepLabHead has none
    "transformers.SegformerForSemanticSegmentation": {"decode_head.classifier": "decode_head.dropout"},
    "transformers.DPTForSemanticSegmentation": {
        "head.head.4": "head.head.3",
        "auxiliary_head.head.4": "auxiliary_head.head.3",
    },
    **{
        f"transformers.{name}": {"segmentation_head.classifier.convolution": "segmentation_head.dropout"}
        for name in (
            "MobileViTForSemanticSegmentation",
            "MobileViTV2ForSemanticSegmentation",
            "MobileNetV2ForSemanticSegmentation",
        )
    },
    "segmentation_models_pytorch.FPN": {"segmentation_head.0": "decoder.dropout"},  # the decoder's last layer
    "segmentation_models_pytorch.PSPNet": {"segmentation_head.0": "decoder.dropout"},
    "segmentation_models_pytorch.DPT": {"segmentation_head.head.4": "segmentation_head.head.3"},
}

# mmseg decode heads that also feed another layer with the dropout of their cls_seg (the rest use it in cls_seg only)
_MMSEG_SHARED_DROPOUT = ("DAHead", "ANNHead")

HeadFactory = Callable[[int, int], AdaptiveHead]


@dataclass(frozen=True)
class _Classifiers:
    """Where a model's classifiers are: the main one, the auxiliary one and the host's weight of its loss."""

    main: str
    aux: str | None = None
    aux_weight: float | None = None
    prefix: str = ""  # where the known model sits in the module tree


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _known_key(module: nn.Module, table: Container[str]) -> str | None:
    """The first class of ``module``'s MRO that ``table`` names as ``"<library>.<class>"``."""
    for cls in type(module).__mro__:
        key = f"{cls.__module__.partition('.')[0]}.{cls.__name__}"
        if key in table:
            return key
    return None


def _aux_weight(host: nn.Module, key: str, aux: str) -> float | None:
    """The host library's weight of the auxiliary CE: torchvision's recipe 0.5, HF's ``auxiliary_loss_weight``,
    mmseg's ``loss_weight`` of the auxiliary head's loss."""
    library = key.partition(".")[0]
    if library in _AUX_WEIGHTS:
        return _AUX_WEIGHTS[library]
    if library == "transformers":
        value = getattr(getattr(host, "config", None), "auxiliary_loss_weight", None)
        return float(value) if isinstance(value, (int, float)) else None
    if library == "mmseg":
        return mmseg_ce_weight(getattr(_get(host, aux.rpartition(".")[0]), "loss_decode", None))
    return None


def mmseg_ce_weight(loss_decode: nn.Module | None) -> float | None:
    """The weight an mmseg decode head gives its cross-entropy, which the adaptive head's extra terms take too (here
    for an auxiliary head replaced by :func:`replace_classifier`, in :mod:`adaptive_heads.integrations.mmseg` for
    the ``Adaptive<Head>`` decode heads).

    ``loss_decode`` is one loss module or an ``nn.ModuleList`` of them (mmseg sums their outputs, in any order):
    the ``loss_weight`` of its ``CrossEntropyLoss`` (the one entry of that class or a subclass, wherever it is in
    the list), else of its only loss; ``None`` when that is ambiguous (several losses and no, or several, CEs).
    """
    if loss_decode is None:
        return None
    losses = list(loss_decode) if isinstance(loss_decode, nn.ModuleList) else [loss_decode]
    ces = [m for m in losses if any(c.__name__ == "CrossEntropyLoss" for c in type(m).__mro__)]
    chosen = ces if len(ces) == 1 else losses if len(losses) == 1 else []
    value = getattr(chosen[0], "loss_weight", None) if chosen else None
    return float(value) if isinstance(value, (int, float)) else None


def _host_hint(parent: nn.Module | None) -> str:
    """For the unsupervised-training warning: the host library's route that supervises the head itself."""
    mmseg = [c for c in type(parent).__mro__ if c.__module__.startswith("mmseg.models.decode_heads")]
    if mmseg:  # an mmseg decode head (or a subclass): its Adaptive<Head> config type
        return (
            f". In mmseg (Runner, tools/train.py) use the config route instead, which supervises the head: "
            f"decode_head=dict(type='Adaptive{mmseg[0].__name__}', adaptive=dict(type=...)) with custom_imports="
            "dict(imports=['adaptive_heads.integrations.mmseg']) (docs: Integrations, 'From mmseg'); in your own "
            "loop, wrap model.loss(inputs, data_samples) in supervise(model, target)"
        )
    return ""


def _known_classifiers(model: nn.Module) -> _Classifiers | None:
    """The classifiers of the one known model class in ``model``'s module tree (``None`` if there is none).

    Raises ``ValueError`` for a model that sums several classifiers (LR-ASPP) and for a tree that holds more
    than one known model side by side."""
    found: list[tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        if any(name == p or name.startswith(f"{p}.") for p, _, _ in found if p):
            continue  # inside a model already found
        key = _known_key(module, KNOWN_CLASSIFIER_PATHS) or _known_key(module, _SUMMED_CLASSIFIERS)
        if key is not None:
            found.append((name, module, key))
        if found and found[0][0] == "":
            break  # the model itself is known
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(f"{p!r} ({type(m).__name__})" for p, m, _ in found)
        raise ValueError(f"{type(model).__name__} holds several segmentation models: {names}; pass path=")
    prefix, host, key = found[0]
    if key in _SUMMED_CLASSIFIERS:
        low, high = (_join(prefix, p) for p in _SUMMED_CLASSIFIERS[key])
        raise ValueError(
            f"{type(host).__name__} sums two classifier convs ({low!r} and {high!r}); pass path= to say which one "
            "to replace"
        )
    heads = getattr(host, "decode_head", None)
    if key == "mmseg.EncoderDecoder" and isinstance(heads, nn.ModuleList) and len(heads) > 0:
        last = _join(prefix, f"decode_head.{len(heads) - 1}.conv_seg")
        if _get(host, "auxiliary_head.conv_seg") is None:
            return _Classifiers(last, prefix=prefix)
        weight = _aux_weight(host, key, "auxiliary_head.conv_seg")
        return _Classifiers(last, _join(prefix, "auxiliary_head.conv_seg"), weight, prefix=prefix)
    for main, aux in KNOWN_CLASSIFIER_PATHS[key]:
        if _get(host, main) is not None:
            if aux is None or _get(host, aux) is None:
                return _Classifiers(_join(prefix, main), prefix=prefix)
            weight = _aux_weight(host, key, aux)
            return _Classifiers(_join(prefix, main), _join(prefix, aux), weight, prefix)
    return None


def _classifier_convs(model: nn.Module, num_classes: int, outside: str = "") -> list[str]:
    """Paths of the convs (and adaptive heads) with ``num_classes`` outputs, except those inside an adaptive head
    (its own coarse conv) and, with ``outside``, those in the module at that path."""

    def within(path: str, root: str) -> bool:
        return path == root or path.startswith(f"{root}.")

    heads = [n for n, m in model.named_modules() if isinstance(m, AdaptiveHead) and n]
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, AdaptiveHead))
        and m.out_channels == num_classes
        and not any(n != h and within(n, h) for h in heads)
        and not (outside and within(n, outside))
    ]


def _infer_num_classes(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for owner, attr in ((config, "num_labels"), (model, "num_classes")):
        value = getattr(owner, attr, None) if owner is not None else None
        if isinstance(value, int):
            return value
    return None


def _locate(model: nn.Module, num_classes: int | None) -> _Classifiers:
    name = type(model).__name__
    known = _known_classifiers(model)
    if known is not None:
        if known.prefix:  # a known model inside something else: no other conv may look like a classifier
            classes = int(getattr(model.get_submodule(known.main), "out_channels", 0))
            others = _classifier_convs(model, classes, outside=known.prefix)
            if others:
                raise ValueError(
                    f"{name} holds a known segmentation model at {known.prefix!r} (classifier {known.main!r}) and "
                    f"other convs that could be the classifier: {others}; pass path="
                )
        return known
    num_classes = num_classes if num_classes is not None else _infer_num_classes(model)
    if num_classes is None:
        raise ValueError(
            f"cannot locate the classifier of {name}: it is not a known model class and num_classes is "
            "unknown; pass num_classes= or path="
        )
    matches = _classifier_convs(model, num_classes)
    if not matches:
        raise ValueError(f"no nn.Conv2d with out_channels={num_classes} found in {name}; pass path=")
    if len(matches) > 1:
        raise ValueError(
            f"{name} has {len(matches)} convs with out_channels={num_classes} that could be its classifier: "
            f"{matches}; pass path= (the main classifier first, e.g. path={matches[-1]!r})"
        )
    return _Classifiers(matches[0])


def find_classifier(model: nn.Module, num_classes: int | None = None, include_aux: bool = False) -> list[str]:
    """Paths of the classifier convs of ``model`` (the main one first, then the auxiliary one if asked).

    A known model class (:data:`KNOWN_CLASSIFIER_PATHS`: torchvision, smp, HF transformers, mmseg; subclasses
    too, and inside any wrapper module) gives its known paths. Otherwise the classifier is the one ``nn.Conv2d``
    with ``out_channels == num_classes`` (``num_classes`` defaults to ``model.config.num_labels`` or
    ``model.num_classes``); when several convs qualify, a ``ValueError`` names them.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 5, 1))
        >>> find_classifier(model, num_classes=5)
        ['1']
    """
    located = _locate(model, num_classes)
    return [located.main, located.aux] if include_aux and located.aux is not None else [located.main]


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


def _mmseg_head_dropout(head_class: type) -> bool:
    """Whether an mmseg decode head class applies its ``dropout`` in ``BaseDecodeHead.cls_seg`` only, right before
    ``conv_seg``: a head that overrides ``cls_seg`` (PointHead) or also feeds another layer with it
    (:data:`_MMSEG_SHARED_DROPOUT`) does not count."""
    mro = head_class.__mro__
    base = next((c for c in mro if c.__name__ == "BaseDecodeHead" and c.__module__.startswith("mmseg.")), None)
    return (
        base is not None
        and getattr(head_class, "cls_seg", None) is getattr(base, "cls_seg", None)
        and not any(c.__name__ in _MMSEG_SHARED_DROPOUT for c in mro)
    )


def _known_dropout(model: nn.Module, path: str, located: _Classifiers | None) -> str | None:
    """The path of the dropout a known model applies right before its classifier at ``path`` and nowhere else."""
    if located is None or path not in (located.main, located.aux):
        return None
    host = model.get_submodule(located.prefix) if located.prefix else model
    key = _known_key(host, KNOWN_CLASSIFIER_PATHS)
    relative = path[len(located.prefix) + 1 :] if located.prefix else path
    if key == "mmseg.EncoderDecoder":
        parent = relative.rpartition(".")[0]
        found = f"{parent}.dropout" if _mmseg_head_dropout(type(_get(host, parent))) else None
    else:
        found = _KNOWN_DROPOUTS.get(key or "", {}).get(relative)
    if found is None or not isinstance(_get(host, found), _DropoutNd):
        return None
    return _join(located.prefix, found)


def _dropout_before(model: nn.Module, path: str) -> str | None:
    """A dropout that sits right before the classifier at ``path`` by the module tree's layout (an
    ``nn.Sequential``'s previous item, a ``dropout`` beside it): what a warning points at. The layout cannot show
    that it feeds the classifier alone (a loop may read its output again, an in-place dropout changes its input
    for every other reader), so it is never moved without being named."""
    parent_path, _, leaf = path.rpartition(".")
    parent = _get(model, parent_path) if parent_path else model
    candidates = []
    if isinstance(parent, nn.Sequential) and leaf.isdigit() and int(leaf) > 0:
        candidates.append(_join(parent_path, str(int(leaf) - 1)))
    candidates.append(_join(parent_path, "dropout"))
    return next((c for c in candidates if isinstance(_get(model, c), _DropoutNd)), None)


AbsorbDropout = bool | str | Mapping[str, str]


def _dropout_to_absorb(
    model: nn.Module, path: str, paths: list[str], located: _Classifiers | None, absorb_dropout: AbsorbDropout
) -> tuple[str | None, bool]:
    """The dropout to move into the head at ``path`` and whether the user named it."""
    if absorb_dropout is False:
        return None, False
    if isinstance(absorb_dropout, str):
        if len(paths) > 1:
            raise ValueError(
                f"absorb_dropout={absorb_dropout!r} names one dropout but {len(paths)} classifiers are replaced "
                f"({paths}): pass a mapping {{classifier path: dropout path}}"
            )
        return absorb_dropout, True
    if isinstance(absorb_dropout, Mapping):
        unknown = sorted(set(absorb_dropout) - set(paths))
        if unknown:
            raise ValueError(f"absorb_dropout names classifiers {unknown} that are not replaced here ({paths})")
        return absorb_dropout.get(path), path in absorb_dropout
    if absorb_dropout is not True:
        raise TypeError(
            "absorb_dropout must be True, False, a dropout's path or a mapping {classifier path: dropout path}, "
            f"got {type(absorb_dropout).__name__}"
        )
    return _known_dropout(model, path, located), False


def _absorb_dropout(model: nn.Module, path: str, head: AdaptiveHead, dropout_path: str, named: bool) -> None:
    """Move the dropout at ``dropout_path`` into ``head`` (its coarse path only), where the head takes it."""
    dropout = _get(model, dropout_path)
    if not isinstance(dropout, _DropoutNd):
        found = "nothing" if dropout is None else f"a {type(dropout).__name__}"
        raise ValueError(f"absorb_dropout: {dropout_path!r} is {found}, expected the dropout before {path!r}")
    places = sum(m is dropout for _, m in model.named_modules(remove_duplicate=False))
    if places > 1:  # one module at several paths: replacing one path would leave the others
        if named:
            raise ValueError(f"absorb_dropout: the {type(dropout).__name__} at {dropout_path!r} is registered at "
                             f"{places} paths; it also feeds other layers")  # fmt: skip
        return
    if head.take_input_dropout(float(dropout.p)):
        _set(model, dropout_path, nn.Identity())
        logger.info(
            "replace_classifier: %r (%r) fed the classifier at %r; it is now nn.Identity and %s applies %r to its "
            "coarse logits only, as the official head (absorb_dropout=False keeps it)",
            dropout_path, dropout, path, type(head).__name__, getattr(head, "dropout", None),
        )  # fmt: skip


def _warn_of_a_dropout_left_before(model: nn.Module, path: str, head: AdaptiveHead) -> None:
    """An unknown model's dropout right before the classifier stays and reaches every branch of a CAC or SSA-Seg
    head (the official heads drop out the coarse path only): say so, and how to move it."""
    found = _dropout_before(model, path)
    takes = type(head).take_input_dropout is not AdaptiveHead.take_input_dropout  # CAC, SSA-Seg
    dropout = _get(model, found) if found is not None else None
    if dropout is None or not takes or float(getattr(dropout, "p", 0.0)) == 0:
        return
    warnings.warn(
        f"replace_classifier: {found!r} ({dropout!r}) sits right before the classifier at {path!r}. It stays and "
        f"reaches every branch of {type(head).__name__} (the official head drops out its coarse path only): only a "
        "known model's dropout (torchvision, HF transformers, smp, mmseg) moves by itself. If it feeds this "
        f"classifier alone, pass absorb_dropout={found!r}; absorb_dropout=False keeps it without this warning",
        UserWarning,
        stacklevel=3,
    )


def _warn_of_an_output_activation(model: nn.Module, located: _Classifiers | None) -> None:
    """smp models built with ``activation=`` (``"softmax2d"``, ``"sigmoid"``, ...) return probabilities: a
    cross-entropy on ``model(x)`` then trains on probabilities, silently. Warn where the replaced model is one."""
    if located is None:
        return
    host = model.get_submodule(located.prefix) if located.prefix else model
    key = _known_key(host, KNOWN_CLASSIFIER_PATHS)
    head = _get(host, "segmentation_head")
    if key is None or not key.startswith("segmentation_models_pytorch.") or head is None:
        return
    for path, module in head.named_modules():
        inner = getattr(module, "activation", None)
        if type(module).__name__ == "Activation" and isinstance(inner, nn.Module):
            if not isinstance(inner, (nn.Identity, nn.LogSoftmax)):  # CE of log-probabilities is CE of logits
                where = _join(_join(located.prefix, "segmentation_head"), path)
                warnings.warn(
                    f"replace_classifier: {type(host).__name__} applies {inner!r} after its classifier "
                    f"({where!r}, smp's activation=), so model(x) returns probabilities: a cross-entropy on them "
                    "trains on probabilities (the adaptive heads' own terms under supervise() use the logits). "
                    "Build the model with activation=None for training and apply the activation to its output "
                    "at inference",
                    UserWarning,
                    stacklevel=3,
                )
            return


def replace_classifier(
    model: nn.Module,
    head: str | HeadFactory,
    path: str | list[str] | None = None,
    *,
    num_classes: int | None = None,
    include_aux: bool = False,
    copy_weights: bool = True,
    absorb_dropout: AbsorbDropout = True,
    **head_options: Any,
) -> nn.Module:
    """Swap the final classifier conv of ``model`` for the adaptive head ``head`` in place.

    Args:
        model: the segmentation model.
        head: the head: its name (``"cac"``, ``"ssa"``, ``"proto"`` or the class name, see
            :func:`~adaptive_heads.head_by_name`), its class (``ContextAwareClassifier``) or any callable
            ``(in_channels, num_classes) -> AdaptiveHead`` (e.g. a ``functools.partial``).
        path: the dotted path(s) of the conv(s) to replace; default: found by :func:`find_classifier`.
        num_classes: for the fallback search when the model class is not known.
        include_aux: also replace the known auxiliary classifier.
        copy_weights: copy the original conv's weight and bias (1×1 or k×k) into the new head's coarse classifier
            (:meth:`~adaptive_heads.head.AdaptiveHead.adopt_classifier`).
        absorb_dropout: a dropout the model applies right before the classifier reaches every branch of a CAC or
            SSA-Seg head; the official heads apply dropout to the coarse logits' input only. Such a dropout becomes
            ``nn.Identity`` and the head's own coarse-path dropout takes its rate (unless the head was built with a
            ``dropout=`` rate) (:meth:`~adaptive_heads.head.AdaptiveHead.take_input_dropout`; logged at INFO level
            by ``logging.getLogger("adaptive_heads.replace")``). Which one: with ``True`` (default) that of a known
            model (torchvision's FCN heads and every torchvision auxiliary head, HF Segformer, DPT, MobileViT and
            MobileNetV2, smp's FPN, PSPNet and DPT, mmseg's decode heads that use it in ``cls_seg`` only), from a
            table of facts about each library; elsewhere none moves, and a dropout found right before the
            classifier (an ``nn.Sequential``'s previous item, a ``dropout`` attribute beside it) is named in a
            ``UserWarning``. A path (``"decoder.dropout"``), or a mapping ``{classifier path: dropout path}`` when
            several classifiers are replaced, names it explicitly: you know it feeds the classifier alone. ``False``
            keeps every dropout. ProtoSeg keeps the host's dropout (the official ProtoSeg embeds dropped-out
            features).
        **head_options: keyword options of the head (``tau=10.0``), given to it for every classifier replaced.

    Returns:
        ``model`` (modified in place). ``model.adaptive_head_paths`` lists every path replaced so far (over all
        calls), the main classifier first; ``model.adaptive_main_head`` is its path (``None`` while only a known
        model's auxiliary classifier is replaced); ``model.adaptive_head_weights`` maps an auxiliary head's path to the
        host library's weight of its loss where known (torchvision 0.5, HF ``auxiliary_loss_weight``, mmseg's
        ``loss_weight``), which :func:`~adaptive_heads.supervise` applies to its extra terms.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 5, 1))
        >>> model = replace_classifier(model, "cac", num_classes=5, tau=10.0)  # or ContextAwareClassifier
        >>> model.adaptive_head_paths, type(model[1]).__name__, model[1].tau
        (['1'], 'ContextAwareClassifier', 10.0)
    """
    factory = head_by_name(head) if isinstance(head, str) else head
    if not callable(factory):
        raise TypeError(f"head must be a head name, a head class or a callable, got {type(head).__name__}")
    if head_options:
        factory = functools.partial(factory, **head_options)
    if path is None:
        located: _Classifiers | None = _locate(model, num_classes)
        assert located is not None
        paths = [located.main, located.aux] if include_aux and located.aux is not None else [located.main]
    else:
        paths = [path] if isinstance(path, str) else list(path)
        try:
            located = _known_classifiers(model)
        except ValueError:  # several or summed classifiers: the paths given say which
            located = None
    previous: list[str] = list(getattr(model, "adaptive_head_paths", None) or [])
    previous_main: str | None = getattr(model, "adaptive_main_head", previous[0] if previous else None)
    weights: dict[str, float] = dict(getattr(model, "adaptive_head_weights", None) or {})
    for p in paths:
        old = _get(model, p)
        if old is None:
            raise ValueError(f"{type(model).__name__} has no submodule {p!r}")
        if isinstance(old, AdaptiveHead):
            raise ValueError(f"{p!r} is already an adaptive head ({type(old).__name__})")
        if not isinstance(old, nn.Conv2d):
            raise TypeError(f"{p!r} is a {type(old).__name__}, expected the classifier nn.Conv2d")
        _check_classifier_geometry(p, old)
        if old.out_channels < 2:
            raise ValueError(
                f"{p!r} has out_channels={old.out_channels}: a binary model with one sigmoid output; an adaptive "
                "head classifies among at least 2 classes: build the model with 2 classes and train it with "
                "cross-entropy"
            )
        new = factory(old.in_channels, old.out_channels)
        if not isinstance(new, AdaptiveHead):
            raise TypeError(
                f"head must be a head name, a head class or a callable returning an AdaptiveHead, got {head!r}"
            )
        param = old.weight
        new.to(device=param.device, dtype=param.dtype)
        new.adopt_classifier(old, copy_weights)
        new.train(old.training)
        new._unsupervised_hint = _host_hint(_get(model, p.rpartition(".")[0]) if "." in p else model)
        _set(model, p, new)
        dropout_path, named = _dropout_to_absorb(model, p, paths, located, absorb_dropout)
        if dropout_path is not None:
            _absorb_dropout(model, p, new, dropout_path, named)
        elif absorb_dropout is True:
            _warn_of_a_dropout_left_before(model, p, new)
        if located is not None and p == located.aux and located.aux_weight is not None:
            weights[p] = located.aux_weight
    _warn_of_an_output_activation(model, located)
    replaced = [*previous, *paths]
    # the main classifier: of a known model its known path (None while only its auxiliary one is replaced), of
    # another model the first path ever replaced
    main = previous_main if previous else (located.main if located is not None else paths[0])
    if located is not None and main is None and located.main in replaced:
        main = located.main
    if main not in replaced:
        main = None
    model.adaptive_head_paths = [*([main] if main else []), *(p for p in replaced if p != main)]  # type: ignore[assignment]
    model.adaptive_main_head = main  # type: ignore[assignment]
    model.adaptive_head_weights = weights  # type: ignore[assignment]
    return model
