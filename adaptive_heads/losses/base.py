"""``HeadLoss``: named loss terms, per-term weights and their weighted total."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar, Generic, Literal, TypeVar

from torch import Tensor, nn

from .._types import Reduction
from .._validation import check_choice, check_target
from ..functional import (
    resize_labels_nearest,
    upsampled_cross_entropy,
)
from ..outputs import HeadOutput

__all__ = ["HeadLoss", "feature_resolution_target"]


OutputT = TypeVar("OutputT", bound="HeadOutput")


def feature_resolution_target(feature_target: Tensor | None, target: Tensor, logits: Tensor) -> Tensor:
    """The labels at the logits' resolution: the head's own ``feature_target`` when it matches, otherwise
    ``target [B, H, W]`` nearest-resized to ``logits [B, n, h, w]``."""
    if feature_target is not None and feature_target.shape[-2:] == logits.shape[-2:]:
        return feature_target
    return resize_labels_nearest(target, tuple(logits.shape[-2:]))


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
        (1.0, 'ce', ('distill_mix', 'relation_tau'))
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
