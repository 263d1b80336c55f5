"""``HeadLoss``: named loss terms, per-term weights and their weighted total."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from torch import Tensor, nn

from .._types import Reduction
from .._validation import check_and_split_target, check_choice
from ..functional import (
    resize_labels_nearest,
    upsampled_cross_entropy,
    upsampled_cross_entropy_sums,
    valid_labels,
)
from ..outputs import HeadOutput

__all__ = ["HeadLoss", "SharedTerms", "feature_resolution_target"]


OutputT = TypeVar("OutputT", bound="HeadOutput")


def feature_resolution_target(feature_target: Tensor | None, target: Tensor, logits: Tensor) -> Tensor:
    """The labels at the logits' resolution: the head's own ``feature_target`` when it matches, otherwise
    ``target [B, H, W]`` nearest-resized to ``logits [B, n, h, w]``."""
    if feature_target is not None and feature_target.shape[-2:] == logits.shape[-2:]:
        return feature_target
    return resize_labels_nearest(target, tuple(logits.shape[-2:]))


class _WeightedSum(torch.autograd.Function):
    """``Σ w_k·v_k`` of scalar terms ``v_k`` with Python weights ``w_k``: one multiply for all the terms each way
    (autograd's own products would launch one kernel per term and direction)."""

    @staticmethod
    def forward(ctx, weights: tuple[float, ...], *values: Tensor) -> Tensor:
        ctx.weights = weights
        if any(weight != 1 for weight in weights):
            values = tuple(torch._foreach_mul(list(values), list(weights)))
        return torch.stack(values).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        weights = list(ctx.weights)
        if all(weight == 1 for weight in weights):
            return None, *(grad,) * len(weights)
        return None, *torch._foreach_mul([grad] * len(weights), weights)


class SharedTerms:
    """Several loss terms computed together, once, when the first of them is asked for: ``shared[name]`` is the
    term function of ``name`` for :meth:`HeadLoss.computed`."""

    def __init__(self, compute: Callable[[], dict[str, Tensor]]) -> None:
        self._compute = compute
        self._values: dict[str, Tensor] | None = None

    def __getitem__(self, name: str) -> Callable[[], Tensor]:
        def term() -> Tensor:
            if self._values is None:
                self._values = self._compute()
            return self._values[name]

        return term


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

    def terms(self, out: OutputT, target: Tensor, skip: Container[str] = ()) -> dict[str, Tensor]:
        """The named loss terms of ``out`` against ``target`` (no total): every term with a non-zero weight, and
        the main term (reported for logging even where a model's own loss covers it), except those in ``skip``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def computed(self, terms: Mapping[str, Callable[[], Tensor]], skip: Container[str] = ()) -> dict[str, Tensor]:
        """Evaluate the term functions :meth:`terms` wants: a term weighted 0, or in ``skip``, is not computed."""
        return {
            name: compute()
            for name, compute in terms.items()
            if name not in skip and (name == self.main_term or self.weights.get(name, 0.0) != 0)
        }

    def wanted(self, names: Iterable[str], skip: Container[str] = ()) -> list[str]:
        """The terms of ``names`` that :meth:`computed` evaluates (weighted, or the main term; not in ``skip``)."""
        return [n for n in names if n not in skip and (n == self.main_term or self.weights.get(n, 0.0) != 0)]

    def cross_entropy(
        self, logits: Tensor, target: Tensor, *, align_corners: bool, average: Literal["valid", "all"] = "valid"
    ) -> Tensor:
        """A CE term at label resolution with this loss's ``ignore_index`` and ``reduction``
        (:func:`~adaptive_heads.functional.upsampled_cross_entropy`)."""
        return upsampled_cross_entropy(
            logits, target, ignore_index=self.ignore_index, align_corners=align_corners, average=average,
            reduction=self.reduction,
        )  # fmt: skip

    def cross_entropies(
        self,
        logits: Mapping[str, Tensor],
        target: Tensor | tuple[Tensor, Tensor],
        *,
        align_corners: bool,
        main: str | None = None,
    ) -> SharedTerms:
        """CE terms of several logits against ``target`` (a label map, or its :meth:`split_target` split) in one
        pass that upsamples them together (:func:`~adaptive_heads.functional.upsampled_cross_entropy_sums`),
        computed when the first is asked for: ``{name: term function}``. Each is averaged over the valid pixels, the
        one named ``main`` as ``main_average`` says."""
        names = list(logits)
        labels, valid = target if isinstance(target, tuple) else (target, None)

        def compute() -> dict[str, Tensor]:
            sums, count = upsampled_cross_entropy_sums(
                list(logits.values()), labels, ignore_index=self.ignore_index, align_corners=align_corners,
                valid=valid,
            )  # fmt: skip
            if self.reduction == "sum":
                return dict(zip(names, sums.unbind(), strict=True))
            means = (sums / count.clamp_min(1.0)).unbind()
            values = dict(zip(names, means, strict=True))
            if main in values and self.main_average == "all":
                values[main] = sums[names.index(main)] / labels.numel()
            return values

        return SharedTerms(compute)

    def checked_target(self, out: HeadOutput, target: Tensor) -> Tensor:
        """``out`` must be this loss's output type; ``target`` a valid ``[B, H, W]`` label map for its logits."""
        return self.split_target(out, target)[0]

    def split_target(self, out: HeadOutput, target: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """:meth:`checked_target` and its ``(safe, valid)`` split (:func:`~adaptive_heads.functional.valid_labels`),
        reused from the head's own check of the same labels where it made one; ``valid`` as a 0/1 float32 mask
        (what the label-resolution terms weight the pixels with)."""
        if not isinstance(out, self.output_type):
            raise TypeError(
                f"out must be a {self.output_type.__name__} (from head(feat, target) in training), "
                f"got {type(out).__name__}"
            )
        logits = out.logits
        recorded: tuple[Any, ...] = getattr(out, "_checked_target", (None,) * 4)  # head.CHECKED_TARGET
        given, ignore_index, checked, split = recorded
        if given is not target or ignore_index != self.ignore_index:  # not what the head read
            checked, split = check_and_split_target(
                target,
                batch_size=logits.shape[0],
                num_classes=logits.shape[1],
                ignore_index=self.ignore_index,
                device=logits.device,
            )
        safe, valid = split if split is not None else valid_labels(checked, logits.shape[1], self.ignore_index)
        return checked, (safe, valid.to(torch.float32))

    def combine(self, terms: Mapping[str, Tensor], exclude: Iterable[str] = (), anchor: Tensor | None = None) -> Tensor:
        """``Σ weight[k]·terms[k]`` over the weighted terms not in ``exclude`` (0, on ``anchor``'s device or the
        terms', when there is none)."""
        skip = set(exclude)
        chosen = [(value, self.weights.get(name, 0.0)) for name, value in terms.items() if name not in skip]
        chosen = [(value, weight) for value, weight in chosen if weight != 0]
        if not chosen:
            anchor = next(iter(terms.values())) if anchor is None else anchor
            return anchor.new_zeros((), dtype=torch.float32)
        if len(chosen) == 1:
            value, weight = chosen[0]
            return value if weight == 1 else weight * value
        values, weights = zip(*chosen, strict=True)
        if len(values) <= 3 and all(weight == 1 for weight in weights):  # no more adds than a stack and a sum
            total = values[0]
            for value in values[1:]:
                total = total + value
            return total
        return _WeightedSum.apply(weights, *values)

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
