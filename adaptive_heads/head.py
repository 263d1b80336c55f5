"""``AdaptiveHead``: what every head shares as a drop-in for the final 1×1 classifier conv (``reset_parameters``
and ``init_weights``, the ``supervise`` hook, saved options, stripping)."""

from __future__ import annotations

import copy
import inspect
import os
import sys
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ._saved_options import compare_saved_options, decode_saved_options, encode_saved_options
from ._validation import check_and_split_target, check_features, is_tracing, plain_option
from .losses.base import HeadLoss
from .outputs import HeadOutput

__all__ = ["AdaptiveHead"]


HeadT = TypeVar("HeadT", bound="AdaptiveHead")
#: where a head's training output keeps the label map it checked, ``(given, ignore_index, checked, split)`` with
#: ``split`` the ``(safe, valid)`` pair computed on the way (or ``None``): not a field
#: (``dataclasses.fields`` and ``replace`` see the outputs' data only)
CHECKED_TARGET = "_checked_target"
_INTERNAL = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


#: floating dtypes by width, for :func:`_promote`
_WIDTH = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4, torch.float64: 8}


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` of two floating dtypes, decided on the host (an aten call per forward otherwise)."""
    if a == b or _WIDTH.get(a, 0) > _WIDTH.get(b, 0):
        return a
    if _WIDTH.get(b, 0) > _WIDTH.get(a, 0):
        return b
    return torch.promote_types(a, b)  # bfloat16 with float16: float32


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

    def __init__(self, in_channels: int, num_classes: int, ignore_index: int | None = 255) -> None:
        super().__init__()
        in_channels, num_classes, ignore_index = (plain_option(v) for v in (in_channels, num_classes, ignore_index))
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
        checked, split = check_and_split_target(
            target,
            batch_size=feat.shape[0],
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            device=feat.device,
        )
        out = self.forward_train(feat, checked)
        setattr(out, CHECKED_TARGET, (target, self.ignore_index, checked, split))  # the loss need not read them again
        return out

    def output_dtype(self, feat: Tensor) -> torch.dtype:
        """dtype of the logits: that of the features and the head's parameters together.

        A ``model.half()`` or ``model.bfloat16()`` gets half logits (the pooling, norms and softmax statistics
        inside still run in float32); a float32 model under autocast gets float32 logits, like the statistics.
        """
        for param in self.parameters():  # the first one (a loop: torch.compile before 2.5 cannot trace next())
            return _promote(feat.dtype, param.dtype)
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

    def take_input_dropout(self, p: float) -> bool:
        """Take over the rate ``p`` of a dropout the host model applies right before this head's input
        (called by :func:`~adaptive_heads.replace_classifier`); ``True`` if the head applies it itself, so the
        host's dropout can go.

        The base implementation keeps the host's dropout (``False``): ProtoSeg's official head applies
        ``Dropout2d`` to the features its embedding sees. :class:`CosineHead` takes it over.
        """
        return False

    def reset_parameters(self) -> None:
        """Draw a new initialisation, in place, from the current random generator (of each tensor's device):
        every parameter and buffer as the constructor initialises it.

        The layers are reset in the order the constructor built them, each as ``torch.nn`` does (its own
        ``reset_parameters()``), the coarse classifier (:attr:`coarse_classifier`, CAC's and SSA-Seg's ``conv_seg``)
        then with mmseg's ``N(0, init_std²)`` weight and zero bias, ProtoSeg's prototypes as a fresh draw. So under
        the same seed the values equal those of a fresh construction on the same device: ``torch.manual_seed(s);
        head.reset_parameters()`` gives the weights of ``torch.manual_seed(s); type(head)(...)``, and a head built
        under ``torch.device("meta")`` is materialised by ``head.to_empty(device=...)`` then this. Layers dropped
        by :meth:`strip_training_layers` stay dropped; a coarse classifier adopted from a k×k conv keeps its
        geometry.

        Example:
            >>> from adaptive_heads import ContextAwareClassifier
            >>> _ = torch.manual_seed(0)
            >>> fresh = ContextAwareClassifier(16, 5)
            >>> head = ContextAwareClassifier(16, 5)  # other draws
            >>> _ = torch.manual_seed(0)
            >>> head.reset_parameters()
            >>> all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), fresh.state_dict().values()))
            True
        """
        reset: list[str] = []
        with torch.no_grad():
            for name, module in self.named_modules():
                if module is self or any(name.startswith(f"{done}.") for done in reset):
                    continue
                own_reset = getattr(module, "reset_parameters", None)
                if callable(own_reset):
                    own_reset()
                    reset.append(name)
                    if name == self.coarse_classifier:
                        self.reset_coarse_classifier()

    def init_weights(self) -> None:
        """mmengine's initialisation hook: :meth:`reset_parameters`, the official initialisation drawn anew.

        mmengine's ``BaseModule.init_weights()`` (called by ``Runner.train()``) first applies a decode head's
        ``init_cfg``; mmseg's ``Normal(std=0.01, override=dict(name="conv_seg"))`` reaches every layer of the module
        at ``conv_seg``, the adaptive head once :func:`~adaptive_heads.replace_classifier` has put it there
        (LayerNorm scales to ≈ 0, projector weights to N(0, 0.01²)). mmengine then calls the ``init_weights()`` of
        each child module, this method, which gives every layer its constructor's initialisation and the coarse
        classifier mmseg's N(0, ``init_std``²) (the ``Adaptive*`` decode heads of
        :mod:`adaptive_heads.integrations.mmseg` take ``init_std`` from that ``init_cfg``). Call it before wrapping
        the model for sharded training (FSDP), as mmengine's runner does.
        """
        self.reset_parameters()

    def initialize_missing(self, keys: Iterable[str] = ()) -> None:
        """Give the tensors at ``keys`` (state-dict keys relative to the head: what a loader reports as missing or
        mismatched) this head's own initialisation, drawn anew, and every non-persistent buffer (ProtoSeg's
        ``usage_counts``) its constructor's value; the other tensors keep what was loaded.

        For loaders that initialise what they could not fill by their own rules (transformers' ``from_pretrained``
        gives such a tensor its model's ``_init_weights``, which knows nothing of the heads, and leaves
        non-persistent buffers as allocated): :meth:`AdaptiveSegmentationModel.from_pretrained
        <adaptive_heads.integrations.hf.AdaptiveSegmentationModel.from_pretrained>` calls it. The draws come from
        :meth:`reset_parameters` on a copy of the head (a subclass's ``reset_parameters`` must set its own
        non-persistent buffers); plain tensors, not sharded ones (``DTensor``).

        Example:
            >>> from adaptive_heads import PrototypeClassifier
            >>> head = PrototypeClassifier(16, 5)
            >>> _ = head.prototypes.fill_(float("nan"))  # what a loader left uninitialised
            >>> head.initialize_missing(["prototypes"])
            >>> bool(torch.isfinite(head.prototypes).all()), round(float(head.prototypes.norm(dim=-1).mean()), 4)
            (True, 1.0)
        """
        names = set(keys)
        persistent = set(self.state_dict())
        unknown = sorted(names - persistent)
        if unknown:
            raise ValueError(f"{type(self).__name__} has no state-dict keys {unknown}; its keys: {sorted(persistent)}")
        fresh = copy.deepcopy(self)
        fresh.reset_parameters()
        drawn = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
        with torch.no_grad():
            for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
                if name in names or name not in persistent:
                    tensor.copy_(drawn[name])

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

    #: options without effect on the numbers (init, memory, collectives): not compared when loading
    free_options: ClassVar[tuple[str, ...]] = ()
    #: options a loader set on purpose for the load at hand (the ignore index of an HF config given to
    #: ``from_pretrained``): not compared either
    _uncompared_options: tuple[str, ...] = ()

    def get_extra_state(self) -> Tensor:
        """The head's class, shape and :meth:`options`, saved in its state dict (``<prefix>_extra_state``, ``[1024]``
        uint8 of zero-padded JSON, format 1): a load compares them with this head's. See docs/checkpoints.md."""
        return encode_saved_options(self)

    def set_extra_state(self, state: Any) -> None:
        """Compare the saved options with this head's, for loaders that call this directly (transformers 5): a
        warning naming each option that differs (or another head class, or an unreadable record); the head keeps
        its own. ``load_state_dict`` does not come here: it compares after loading every tensor that fits."""
        self._warn_of_other_options(state, type(self).__name__, "_extra_state")

    def _warn_of_other_options(self, saved: Any, where: str, key: str) -> None:
        try:
            changes = compare_saved_options(self, decode_saved_options(saved, key))
        except ValueError as error:  # a newer format, corrupt bytes: the weights load all the same
            warnings.warn(f"{where}: {error}", UserWarning, stacklevel=_caller_level())
            return
        if changes.differs:
            warnings.warn(
                f"{changes.describe(where)}. Every tensor whose shape fits was loaded and this head keeps its own "
                "options (fine-tuning with other options is legitimate; check_state_dict(model, state_dict) raises "
                "on this instead)",
                UserWarning,
                stacklevel=_caller_level(),
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # every tensor whose shape fits loads (torch reports the others as size mismatches); the saved options are
        # compared afterwards and a difference is a warning: the configuration that builds a head lives beside the
        # weights (docs/checkpoints.md, "What a load checks"), and check_state_dict is the strict check
        key = prefix + "_extra_state"
        where = prefix.rstrip(".") or type(self).__name__
        saved = state_dict.pop(key, None)  # compared here, not by torch's call of set_extra_state
        # a plain model's checkpoint from before the swap holds the replaced conv's weight and bias at this path (for
        # CAC and SSA-Seg already moved to the coarse classifier's keys): no adaptive weights, so no options either
        plain = {f"{prefix}weight", f"{prefix}bias"}
        coarse = f"{prefix}{self.coarse_classifier}." if self.coarse_classifier else None
        has_weights = any(
            k.startswith(prefix) and k not in plain and not (coarse and k.startswith(coarse)) for k in state_dict
        )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in missing_keys:  # optional: 0.1 state dicts, parameter-only filters
            missing_keys.remove(key)
        if saved is not None:
            self._warn_of_other_options(saved, where, key)
        elif has_weights:
            warnings.warn(
                f"{where}: the state dict has no saved options ({key!r}: saved by adaptive_heads 0.1, or "
                "filtered to parameters), so they could not be checked against this head's; the weights "
                "loaded as for any module",
                UserWarning,
                stacklevel=_caller_level(),
            )

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, {options}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_supervisor"] = None
        state["_context_collector"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # heads pickled by 0.2.0 carry (CPU generator state, args, kwargs) of their construction, and 0.2's the
        # names of the options given: the head keeps its options as they are
        construction = state.pop("_construction", None)
        state.pop("_explicit_options", None)
        state.pop("_options_mismatch", None)
        super().__setstate__(state)
        parameter = inspect.signature(type(self).__init__).parameters.get("init_std")
        if "init_std" not in self.__dict__ and parameter is not None:  # 0.2.0's ProtoSeg: in the record only
            recorded = construction[2] if construction is not None else {}
            self.init_std = float(recorded.get("init_std", parameter.default))
