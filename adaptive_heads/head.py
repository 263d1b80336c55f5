"""``AdaptiveHead``: what every head shares as a drop-in for the final 1×1 classifier conv (construction
replay for ``init_weights``, the ``supervise`` hook, saved options, stripping)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ._saved_options import encode_saved_options, option_mismatch, training_changes
from ._validation import check_features, check_target, is_tracing
from .losses.base import HeadLoss
from .outputs import HeadOutput

__all__ = ["AdaptiveHead"]


HeadT = TypeVar("HeadT", bound="AdaptiveHead")
_REPLAYING = False  # AdaptiveHead.init_weights() is rebuilding a head
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
    #: where the host library has a route that supervises the head for you, the warning names it (set by
    #: :func:`~adaptive_heads.replace_classifier`; e.g. mmseg's ``Adaptive<Head>`` decode heads)
    _unsupervised_hint: str = ""
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
            "and add sup.loss(); set head.warn_unsupervised = False if this is deliberate" + self._unsupervised_hint,
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
        """The head's class, shape and :meth:`options`, saved in its state dict (``<prefix>_extra_state``, ``[1024]``
        uint8 of zero-padded JSON): loading into a head built with other function options (``tau``...) is an
        error naming them; other training options warn. See ``adaptive_heads/_saved_options.py``."""
        return encode_saved_options(self)

    def set_extra_state(self, state: Any) -> None:
        """Compare the saved options with this head's (loaders that call this directly, as transformers 5 does,
        get the same checks): ``ValueError`` for a function option, a warning for a training option."""
        where = type(self).__name__
        error = option_mismatch(self, state, where)
        if error is not None:
            raise ValueError(error)
        warning = training_changes(self, state, where)
        if warning is not None:
            warnings.warn(warning, stacklevel=_caller_level())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        saved = state_dict.get(prefix + "_extra_state")
        error = None if saved is None else option_mismatch(self, saved, prefix.rstrip(".") or type(self).__name__)
        if error is not None:
            # reported like a size mismatch (load_state_dict raises after the walk, mmengine's strict=False logs
            # it), and none of this head's weights is copied: its keys leave the dict its submodules load from
            error_msgs.append(error)
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]
            return
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
