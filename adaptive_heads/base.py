"""Base classes shared by the three heads and their losses."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._distributed import all_reduce_class_statistics
from ._saved_options import encode_saved_options, refuse_other_options
from ._validation import check_choice, check_features, check_target, is_tracing
from .functional.cosine import pointwise_conv
from .functional.labels import resize_labels_nearest
from .functional.pooling import hard_class_pool
from .functional.upsampled import upsampled_cross_entropy

__all__ = ["AdaptiveHead", "CosineHead", "HeadLoss", "HeadOutput"]

if TYPE_CHECKING:
    pass

HeadT = TypeVar("HeadT", bound="AdaptiveHead")
_REPLAYING = False  # AdaptiveHead.init_weights() is rebuilding a head
OutputT = TypeVar("OutputT", bound="HeadOutput")
Reduction = Literal["mean", "sum"]
#: where a head pools its label-built class statistics: over each image, this process's batch, every rank's batch
LabelPooling = Literal["batch", "image", "global"]
LABEL_POOLINGS: tuple[str, ...] = ("batch", "image", "global")
#: the ``[n, C]`` class direction of a k×k coarse classifier: the sum over its taps, or its centre tap
ClassDirection = Literal["sum", "centre"]


@dataclass
class HeadOutput:
    """Training output of a head. ``logits`` ``[B, n, h, w]`` is what the head predicts at inference.

    Example:
        >>> HeadOutput(logits=torch.zeros(1, 3, 4, 4)).logits.shape
        torch.Size([1, 3, 4, 4])
    """

    logits: Tensor


def feature_resolution_target(feature_target: Tensor | None, target: Tensor, logits: Tensor) -> Tensor:
    """The labels at the logits' resolution: the head's own ``feature_target`` when it matches, otherwise
    ``target [B, H, W]`` nearest-resized to ``logits [B, n, h, w]``."""
    if feature_target is not None and feature_target.shape[-2:] == logits.shape[-2:]:
        return feature_target
    return resize_labels_nearest(target, tuple(logits.shape[-2:]))


_INTERNAL = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside torch and this package: the user's call that ran the model."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


class AdaptiveHead(nn.Module):
    """A drop-in replacement for the final ``nn.Conv2d(in_channels, num_classes, 1)`` of a segmenter.

    Call conventions shared by every head:

    - ``head(feat)`` → logits ``[B, n, h, w]`` (label-free; what eval and export use).
    - ``head(feat, target)`` → a :class:`HeadOutput` subclass with everything the head's loss needs.
    - inside :func:`adaptive_heads.supervise`, a training-mode ``head(feat)`` picks its target from the
      context, records the structured output for the loss and returns the logits, so models that pass only
      features to their classifier need no change.

    A subclass implements :meth:`forward_logits` and :meth:`forward_train` and declares ``loss_type`` (its loss
    module, built by :meth:`default_loss`) and ``training_only`` (the submodules :meth:`strip_training_layers`
    drops for deployment).

    Example:
        >>> from adaptive_heads import HEADS
        >>> head = HEADS["cac"](16, 5)
        >>> isinstance(head, AdaptiveHead), head.out_channels, type(head.default_loss()).__name__
        (True, 5, 'ContextAwareLoss')
    """

    loss_type: ClassVar[type[HeadLoss[Any]]]
    training_only: ClassVar[tuple[str, ...]] = ()
    #: warn (once) when the head trains without labels, outside a supervise() block (a class default, so heads
    #: unpickled from before the attribute existed have it too)
    warn_unsupervised: bool = True
    #: the submodule :meth:`init_weights` gives mmseg's ``N(0, init_std²)`` / zero init (CAC, SSA-Seg: ``conv_seg``)
    coarse_classifier: ClassVar[str | None] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> AdaptiveHead:
        # the constructor's arguments and the CPU generator's state before it drew anything: init_weights()
        # replays the construction to give every layer back the values it was built with
        head = super().__new__(cls)
        object.__setattr__(head, "_construction", (torch.random.get_rng_state(), args, kwargs))
        return head

    def __init__(self, in_channels: int, num_classes: int, ignore_index: int | None = 255) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            hint = (
                " (a binary model with one sigmoid output: use 2 classes and cross-entropy; an adaptive head "
                "classifies each pixel among at least 2 classes)"
                if num_classes == 1
                else ""
            )
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}{hint}")
        if ignore_index is not None and not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            warnings.warn(
                f"ignore_index={ignore_index} is one of the {num_classes} classes: its pixels are left out of every "
                f"label-built statistic and loss term, so class {ignore_index} is never learned; pass an "
                f"ignore_index outside [0, {num_classes}) (e.g. -1 or -100, or None) if it is a real class",
                UserWarning,
                stacklevel=3,
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.stripped = False
        self._supervisor: Any = None
        self._context_collector: Any = None  # set by slide_inference(context="image") during its first pass

    @property
    def out_channels(self) -> int:
        """Alias of ``num_classes``, so code that inspects ``classifier.out_channels`` keeps working."""
        return self.num_classes

    def forward(self, feat: Tensor, target: Tensor | None = None) -> Tensor | HeadOutput:
        check_features(feat, self.in_channels)
        supervisor = self._supervisor
        if target is None and supervisor is not None and self.training:
            out = self._train(feat, supervisor.target)
            supervisor.record(self, out)
            return out.logits
        if target is None:
            collector = self._context_collector
            if collector is not None and not self.training:
                return collector.collect(feat)
            if not is_tracing() and self.training and self.warn_unsupervised and torch.is_grad_enabled():
                self._warn_unsupervised()
            return self.forward_logits(feat)
        return self._train(feat, target)

    def _warn_unsupervised(self) -> None:
        self.warn_unsupervised = False  # once per head
        warnings.warn(
            f"{type(self).__name__} runs in training mode with gradients but without labels: no supervise() block "
            "gives it the target, so it trains on the model's own loss alone (CAC and SSA-Seg lose every extra "
            "term, ProtoSeg's prototypes never move). Wrap the forward in `with supervise(model, target) as sup:` "
            "and add sup.loss(); set head.warn_unsupervised = False if this is deliberate",
            UserWarning,
            stacklevel=_caller_level(),
        )

    def _train(self, feat: Tensor, target: Tensor) -> HeadOutput:
        if self.stripped:
            raise RuntimeError(
                f"{type(self).__name__} was stripped of its training-only layers "
                f"({', '.join(self.training_only) or 'none'}) by strip_training_layers(); training needs them: "
                "build a new head and load the state dict saved before stripping"
            )
        checked = check_target(
            target,
            batch_size=feat.shape[0],
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            device=feat.device,
        )
        return self.forward_train(feat, checked)

    def output_dtype(self, feat: Tensor) -> torch.dtype:
        """dtype of the logits: that of the features and the head's parameters together.

        A ``model.half()`` or ``model.bfloat16()`` gets half logits (the pooling, norms and softmax statistics
        inside still run in float32); a float32 model under autocast gets float32 logits, like the statistics.
        """
        for param in self.parameters():  # the first one (a loop: torch.compile before 2.5 cannot trace next())
            return torch.promote_types(feat.dtype, param.dtype)
        return feat.dtype

    def forward_logits(self, feat: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Inference: ``feat [B, C, h, w]`` → logits ``[B, n, h, w]``."""
        raise NotImplementedError

    def forward_train(self, feat: Tensor, target: Tensor) -> HeadOutput:  # pragma: no cover - abstract
        """Training: ``feat [B, C, h, w]`` and a checked ``target [B, H, W]`` → the structured output."""
        raise NotImplementedError

    def default_loss(self) -> HeadLoss:
        """The head's loss module (``loss_type``) with the official defaults and this head's ``ignore_index``."""
        return self.loss_type(ignore_index=self.ignore_index)

    def adopt_classifier(self, conv: nn.Conv2d, copy_weights: bool = True) -> None:
        """Take over the classifier conv this head replaces (called by :func:`~adaptive_heads.replace_classifier`).

        The base implementation uses nothing of it (ProtoSeg: its prototypes replace the learned class weights, so
        a 1×1 and a k×k classifier are replaced alike); :class:`CosineHead` copies it into its coarse classifier.
        """

    def built_with(self, option: str) -> bool:
        """Whether the constructor was given ``option`` explicitly (``False`` for a default)."""
        return option in self.__dict__.get("_construction", (None, (), {}))[2]

    def take_input_dropout(self, p: float) -> bool:
        """Take over the rate ``p`` of a dropout the host model applies right before this head's input
        (called by :func:`~adaptive_heads.replace_classifier`); ``True`` if the head applies it itself, so the
        host's dropout can go.

        The base implementation keeps the host's dropout (``False``): ProtoSeg's official head applies
        ``Dropout2d`` to the features its embedding sees. :class:`CosineHead` takes it over.
        """
        return False

    def init_weights(self) -> None:
        """Give the head the initialisation of the official code, in place.

        Every layer gets back the values it was constructed with (the constructor is replayed from the CPU
        generator state it started with, so a head built under ``torch.manual_seed(s)`` gets what a fresh head
        built under the same seed has); the coarse classifier (:attr:`coarse_classifier`, CAC's and SSA-Seg's
        ``conv_seg``) gets mmseg's ``N(0, init_std²)`` weight and zero bias, drawn from the current generator.

        mmseg's decode heads carry ``init_cfg=Normal(std=0.01, override=dict(name="conv_seg"))``, which mmengine
        applies to every layer of the module at ``conv_seg``, the adaptive head once it has replaced the
        classifier (LayerNorm scales to ≈ 0, projector weights to N(0, 0.01²)); mmengine then calls the
        ``init_weights()`` of each child module, this method, which undoes it. Buffers (ProtoSeg's prototypes)
        are reset too; layers dropped by :meth:`strip_training_layers` stay dropped.

        The values equal the construction's when the head was built on the CPU (the default; built under another
        default device, the replay draws the same distributions from the CPU generator). Call it before wrapping
        the model for sharded training (FSDP), as mmengine's runner does.
        """
        global _REPLAYING
        if _REPLAYING:  # a subclass that calls init_weights() in its constructor, while it is being replayed
            return
        state, args, kwargs = self.__dict__["_construction"]
        if not args and not kwargs:  # unpickled from before the construction was recorded: the same architecture
            args, kwargs = (self.in_channels, self.num_classes), self.options()
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.random.set_rng_state(state)
            _REPLAYING = True
            try:
                with torch.device("cpu"):
                    fresh = type(self)(*args, **kwargs)
            finally:
                _REPLAYING = False
        own = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        coarse = self.coarse_classifier
        with torch.no_grad():
            for name, value in [*fresh.named_parameters(), *fresh.named_buffers()]:
                if coarse is not None and name.startswith(f"{coarse}."):
                    continue
                mine = own.get(name)
                if mine is not None and mine.shape == value.shape:
                    mine.copy_(value)
        self.reset_coarse_classifier()

    def reset_coarse_classifier(self) -> None:
        """mmseg's init of the coarse classifier (see :meth:`init_weights`); heads without one: nothing."""

    def strip_training_layers(self: HeadT) -> HeadT:
        """Drop the layers only training uses (``training_only``) for deployment; inference is unchanged.

        Training a stripped head raises a ``RuntimeError`` saying so. Returns the head.
        """
        for name in self.training_only:
            setattr(self, name, None)
        self.stripped = True
        return self

    def options(self) -> dict[str, Any]:
        """The keyword options that rebuild this head: ``type(head)(in_channels, num_classes, **head.options())``
        has the same architecture (its weights come from the state dict); used to save models with their heads."""
        return {"ignore_index": self.ignore_index}

    #: options that change only how the head trains: a checkpoint saved with other values loads with a warning
    training_options: ClassVar[tuple[str, ...]] = ("ignore_index",)
    #: options without effect on the numbers (init, memory, collectives): not compared when loading
    free_options: ClassVar[tuple[str, ...]] = ()

    def get_extra_state(self) -> Tensor:
        """The head's class, shape and :meth:`options`, saved in its state dict (``<prefix>_extra_state``, a uint8
        tensor of JSON): loading into a head built with other function options (``tau``...) is refused, naming
        them; other training options warn. See ``adaptive_heads/_saved_options.py``."""
        return encode_saved_options(self)

    def set_extra_state(self, state: Any) -> None:
        """Checked in :meth:`_load_from_state_dict`, before any weight is copied; nothing to restore."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        saved = state_dict.get(prefix + "_extra_state")
        if saved is not None:
            warning = refuse_other_options(self, saved, prefix.rstrip(".") or type(self).__name__)
            if warning is not None:
                warnings.warn(warning, stacklevel=_caller_level())
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, {options}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_supervisor"] = None
        state["_context_collector"] = None
        return state


class CosineHead(AdaptiveHead):
    """Common part of the cosine-classifier heads (CAC, SSA-Seg): the coarse classifier ``conv_seg`` (1×1 as in the
    official code, or the k×k conv of the model it replaces; mmseg's init: N(0, ``init_std``²) weight, zero bias),
    ``Dropout2d`` on its input only, the scale ``tau``.

    A k×k coarse classifier (smp's ``Unet``, ``PSPNet``, ``PAN``, ``MAnet`` end in a 3×3 conv) keeps the model's
    coarse logits exactly; the projectors need one ``[n, C]`` class direction ``W`` per class, taken from the
    kernel by ``class_direction``: ``"sum"`` over its taps (the classifier's response to a spatially constant
    feature map) or its ``"centre"`` tap. For a 1×1 classifier both are its weight. ``"sum"`` is the default: on
    CamVid with a Unet-style decoder (3×3 classifier, 2 seeds, 15 epochs) the two did not differ measurably (CAC
    32.5 vs 32.9, SSA-Seg 35.7 vs 34.4 val mIoU, paired differences of both signs), and the sum is the direction
    the classifier actually applies to a smooth feature map (docs: CamVid experiment).

    Args:
        in_channels: C, channels of the decoder feature map.
        num_classes: n.
        tau: cosine scale (official 15).
        dropout: ``Dropout2d`` probability before ``conv_seg`` (official 0.1; 0 disables).
        ignore_index: label ignored by the label-built branch (and default of the loss).
        eps: added to norms and soft areas (official 1e-12).
        init_std: std of the normal init of ``conv_seg.weight`` (mmseg's 0.01); bias 0.
        kernel_size: of ``conv_seg`` (odd; padded to keep the size): 1 (official) or the replaced classifier's.
        dilation: of ``conv_seg`` (the replaced classifier's).
        class_direction: ``"sum"`` or ``"centre"``, the class direction of a k×k ``conv_seg``.

    Example:
        >>> from adaptive_heads import ContextAwareClassifier
        >>> head = ContextAwareClassifier(16, 5, kernel_size=3, class_direction="centre")
        >>> head.conv_seg.kernel_size, head.classifier_weight.shape
        ((3, 3), torch.Size([5, 16]))
    """

    coarse_classifier = "conv_seg"
    training_options = ("ignore_index", "dropout", "teacher_pooling")
    free_options = ("init_std",)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        tau: float = 15.0,
        dropout: float = 0.1,
        ignore_index: int | None = 255,
        eps: float = 1e-12,
        init_std: float = 0.01,
        kernel_size: int = 1,
        dilation: int = 1,
        class_direction: ClassDirection = "sum",
    ) -> None:
        super().__init__(in_channels, num_classes, ignore_index)
        check_choice("class_direction", class_direction, ("sum", "centre"))
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.class_direction = class_direction
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau = float(tau)
        self.eps = float(eps)
        self.init_std = float(init_std)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(
            in_channels, num_classes, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation
        )
        self.reset_coarse_classifier()

    def reset_coarse_classifier(self) -> None:
        """``conv_seg``: ``N(0, init_std²)`` weight, zero bias (mmseg's ``init_cfg`` of a decode head's classifier)."""
        nn.init.normal_(self.conv_seg.weight, std=self.init_std)
        nn.init.zeros_(cast(Tensor, self.conv_seg.bias))

    def take_input_dropout(self, p: float) -> bool:
        """The host's dropout before the classifier becomes this head's ``Dropout2d(p)`` on the coarse path only
        (the official heads' place for it: the prototypes and the label-built branch see the undropped features);
        ``p = 0`` removes it. A head built with an explicit ``dropout=`` keeps that rate. Returns ``True``."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        if not self.built_with("dropout"):
            self.dropout = nn.Dropout2d(p) if p > 0 else nn.Identity()
        return True

    def options(self) -> dict[str, Any]:
        conv = self.conv_seg
        return {
            **super().options(),
            "tau": self.tau,
            "dropout": float(self.dropout.p) if isinstance(self.dropout, nn.Dropout2d) else 0.0,
            "eps": self.eps,
            "kernel_size": conv.kernel_size[0],
            "dilation": conv.dilation[0],
            "class_direction": self.class_direction,
        }

    @property
    def classifier_weight(self) -> Tensor:
        """The class directions ``W`` ``[n, C]`` the projectors fuse with the prototypes: ``conv_seg.weight`` of a
        1×1 classifier (a reshape, so C = 1 works); of a k×k one, the sum over its taps or its centre tap
        (``class_direction``)."""
        weight = self.conv_seg.weight
        if weight.shape[-2:] == (1, 1):
            return weight.reshape(self.num_classes, self.in_channels)
        if self.class_direction == "sum":
            return weight.sum(dim=(2, 3))
        return weight[:, :, weight.shape[2] // 2, weight.shape[3] // 2]

    def coarse_logits(self, feat: Tensor) -> Tensor:
        """``conv_seg(dropout(feat))`` ``[B, n, h, w]``; for a 1×1 classifier the dropout is folded into the weight
        (no feature copy)."""
        p = float(self.dropout.p) if self.training and isinstance(self.dropout, nn.Dropout2d) else 0.0
        conv = self.conv_seg
        if conv.kernel_size == (1, 1):
            return pointwise_conv(feat, conv.weight, conv.bias, p)
        return conv(F.dropout2d(feat, p) if p > 0 else feat)

    def adopt_classifier(self, conv: nn.Conv2d, copy_weights: bool = True) -> None:
        """Take the replaced classifier's geometry (kernel, padding, dilation, padding mode) and, with
        ``copy_weights``, its weight and bias: the coarse logits equal the model's original logits."""
        geometry = (conv.kernel_size, conv.padding, conv.dilation, conv.padding_mode)
        if geometry != (
            self.conv_seg.kernel_size,
            self.conv_seg.padding,
            self.conv_seg.dilation,
            self.conv_seg.padding_mode,
        ):
            old = self.conv_seg
            pair = cast(tuple[int, int], conv.kernel_size)
            self.conv_seg = nn.Conv2d(
                self.in_channels, self.num_classes, pair, padding=cast(tuple[int, int], conv.padding),
                dilation=cast(tuple[int, int], conv.dilation), padding_mode=conv.padding_mode,
            ).to(device=old.weight.device, dtype=old.weight.dtype)  # fmt: skip
        if copy_weights:
            bias = cast(Tensor, self.conv_seg.bias)
            with torch.no_grad():
                self.conv_seg.weight.copy_(conv.weight)
                if conv.bias is not None:
                    bias.copy_(conv.bias)
                else:
                    bias.zero_()

    def label_class_statistics(
        self, feat: Tensor, feature_target: Tensor, pooling: LabelPooling, one_hot: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Class sums and pixel counts of ``feat [B, C, h, w]`` under ``feature_target [B, h, w]``.

        ``pooling``: ``"image"`` → ``[B, n, C]``, ``[B, n]``; ``"batch"`` → ``[n, C]``, ``[n]`` over this process's
        batch (what the official code does on each GPU); ``"global"`` → the same over every rank's batch, summed by
        one autograd-aware all-reduce of ``[n, C + 1]`` floats in forward and its adjoint in backward
        (``4·n·(C + 1)`` bytes each: 0.3 MB at n = 150, C = 512), so the label-built branch equals one process
        on the concatenated global batch. Without an initialised process group ``"global"`` is ``"batch"``.
        """
        sums, counts = hard_class_pool(
            feat, feature_target, self.num_classes, ignore_index=self.ignore_index, per_image=pooling == "image",
            one_hot=one_hot,
        )  # fmt: skip
        if pooling == "global":
            sums, counts = all_reduce_class_statistics(sums, counts)
        return sums, counts

    @staticmethod
    def _fuse(mlp: nn.Module, first: Tensor, second: Tensor) -> Tensor:
        """``mlp([first, second])`` (concatenated on the last axis) in the projector's own dtype: the pooled
        prototypes come in float32, a half model's projector is half."""
        dtype = next(mlp.parameters()).dtype
        return mlp(torch.cat([first.to(dtype), second.to(dtype)], dim=-1))


class HeadLoss(nn.Module, Generic[OutputT]):
    """Base of the loss modules: named terms, per-term weights and their weighted total.

    ``loss_fn(out, target)`` returns ``{term: value, ..., "loss": Σ weight·term}``. Subclasses implement
    :meth:`terms`, and set ``default_weights`` (the official weights; ``weights=`` overrides some),
    ``output_type`` (the head output they read), ``main_term`` (the CE on the logits the head returns, what a
    model that computes its own CE on the head output already covers) and ``options`` (the names of their own
    options, shown by ``repr``).

    Args (shared by every loss):
        ignore_index: label ignored by every term.
        weights: per-term weights, merged into ``default_weights``.
        reduction: ``"mean"`` or ``"sum"`` of the CE terms.
        main_average: denominator of the main CE: ``"valid"`` pixels (default) or ``"all"`` pixels (what mmseg
            0.x's main loss does in the official CAC and SSA-Seg code).

    Example:
        >>> from adaptive_heads import SSALoss
        >>> loss_fn = SSALoss(weights={"relation": 1.0})
        >>> loss_fn.weights["relation"], loss_fn.main_term, loss_fn.options
        (1.0, 'ce', ('distill_mix', 'tau'))
    """

    main_term: ClassVar[str] = "ce"
    default_weights: ClassVar[Mapping[str, float]] = {}
    output_type: ClassVar[type[HeadOutput]] = HeadOutput
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        ignore_index: int | None = 255,
        weights: Mapping[str, float] | None = None,
        reduction: Reduction = "mean",
        main_average: Literal["valid", "all"] = "valid",
    ) -> None:
        super().__init__()
        check_choice("reduction", reduction, ("mean", "sum"))
        check_choice("main_average", main_average, ("valid", "all"))
        if ignore_index is not None and not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
        unknown = set(weights or {}) - set(self.default_weights)
        if unknown:
            raise ValueError(f"unknown loss terms in weights: {sorted(unknown)}; known: {list(self.default_weights)}")
        self.ignore_index = ignore_index
        self.weights = {**self.default_weights, **(weights or {})}
        self.reduction = reduction
        self.main_average = main_average

    def terms(self, out: OutputT, target: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """The named loss terms of ``out`` against ``target`` (no total): every term with a non-zero weight, and
        the main term (reported for logging even where a model's own loss covers it)."""
        raise NotImplementedError

    def computed(self, terms: Mapping[str, Callable[[], Tensor]]) -> dict[str, Tensor]:
        """Evaluate the term functions :meth:`terms` wants: a term weighted 0 is not computed at all."""
        return {
            name: compute()
            for name, compute in terms.items()
            if name == self.main_term or self.weights.get(name, 0.0) != 0
        }

    def cross_entropy(
        self, logits: Tensor, target: Tensor, *, align_corners: bool, average: Literal["valid", "all"] = "valid"
    ) -> Tensor:
        """A CE term at label resolution with this loss's ``ignore_index`` and ``reduction``
        (:func:`~adaptive_heads.functional.upsampled_cross_entropy`)."""
        return upsampled_cross_entropy(
            logits, target, ignore_index=self.ignore_index, align_corners=align_corners, average=average,
            reduction=self.reduction,
        )  # fmt: skip

    def checked_target(self, out: HeadOutput, target: Tensor) -> Tensor:
        """``out`` must be this loss's output type; ``target`` a valid ``[B, H, W]`` label map for its logits."""
        if not isinstance(out, self.output_type):
            raise TypeError(
                f"out must be a {self.output_type.__name__} (from head(feat, target) in training), "
                f"got {type(out).__name__}"
            )
        logits = out.logits
        return check_target(
            target,
            batch_size=logits.shape[0],
            num_classes=logits.shape[1],
            ignore_index=self.ignore_index,
            device=logits.device,
        )

    def combine(self, terms: Mapping[str, Tensor], exclude: Iterable[str] = ()) -> Tensor:
        """``Σ weight[k]·terms[k]`` over the weighted terms not in ``exclude``."""
        skip = set(exclude)
        total: Tensor | None = None
        for name, value in terms.items():
            weight = self.weights.get(name, 0.0)
            if name in skip or weight == 0:
                continue
            total = weight * value if total is None else total + weight * value
        if total is None:
            anchor = next(iter(terms.values()))
            total = anchor.new_zeros(())
        return total

    def forward(self, out: OutputT, target: Tensor) -> dict[str, Tensor]:
        if not isinstance(out, HeadOutput):
            raise TypeError(
                f"out must be the structured output of head(feat, target), got {type(out).__name__}; "
                "call the head with the target in training"
            )
        terms = self.terms(out, target)
        terms["loss"] = self.combine(terms)
        return terms

    def extra_repr(self) -> str:
        shared = ("ignore_index", "weights", "reduction", "main_average")
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in (*shared, *self.options))
