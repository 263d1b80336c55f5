"""Drop-in training inside models that pass only features to their classifier.

torchvision, smp, HF transformers and mmseg call ``classifier(features)`` deep inside their own
``forward``; labels never reach it. :func:`supervise` is the side channel: it hands the target to every
adaptive head of a model for the duration of a ``with`` block, collects each head's structured training
output, and turns them into the heads' extra loss terms afterwards::

    model = replace_classifier(model, ContextAwareClassifier)
    with supervise(model, target) as sup:
        logits = model(images)["out"]            # the model's forward is untouched
        loss = F.cross_entropy(logits, target, ignore_index=255) + sup.loss()

``sup.loss()`` excludes each head's main CE (the CE on the logits the head returns), which the model's
own loss already covers; ``sup.loss(include_main=True)`` adds it as well. An auxiliary head's terms are weighted
as the host library weighs its auxiliary CE (torchvision's recipe 0.5, HF's ``auxiliary_loss_weight``, mmseg's
``loss_weight``: recorded by :func:`~adaptive_heads.replace_classifier`), or by ``head_weights``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import is_tracing
from .head import AdaptiveHead
from .losses import HeadLoss
from .outputs import HeadOutput

__all__ = ["Supervision", "check_optimizer", "supervise"]


class Supervision:
    """The collector returned by :func:`supervise` (use it as a context manager).

    Example:
        >>> from adaptive_heads import ContextAwareClassifier
        >>> model = torch.nn.Sequential(ContextAwareClassifier(8, 3))
        >>> sup = Supervision(model, torch.zeros(1, 4, 4, dtype=torch.long))
        >>> list(sup.heads), type(sup.loss_fns["0"]).__name__
        (['0'], 'ContextAwareLoss')
    """

    def __init__(
        self,
        model: nn.Module,
        target: Tensor,
        loss_fns: HeadLoss[Any] | Mapping[str, HeadLoss[Any]] | None = None,
        head_weights: Mapping[str, float] | None = None,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(target, Tensor):
            raise TypeError(f"target must be a torch.Tensor of shape [B, H, W], got {type(target).__name__}")
        self.model = model
        self.target = target
        # one walk of the module tree per step: the heads, and the aux weights replace_classifier recorded on this
        # model or on a model inside it
        self.heads: dict[str, AdaptiveHead] = {}
        recorded: dict[str, float] = {}
        for prefix, module in model.named_modules():
            if isinstance(module, AdaptiveHead):
                self.heads[prefix] = module
            for path, weight in (getattr(module, "adaptive_head_weights", None) or {}).items():
                recorded[f"{prefix}.{path}" if prefix else path] = weight
        if not self.heads:
            raise ValueError(
                "supervise(): the model contains no adaptive head; call replace_classifier(model, ...) first"
            )
        if isinstance(loss_fns, HeadLoss):
            loss_fns = dict.fromkeys(self.heads, loss_fns)
        for argument, given in (("loss_fns", loss_fns), ("head_weights", head_weights)):
            unknown = set(given or {}) - set(self.heads)
            if unknown:
                raise ValueError(f"{argument} names unknown heads {sorted(unknown)}; heads: {list(self.heads)}")
        self.loss_fns: dict[str, HeadLoss[Any]] = {
            name: (loss_fns or {}).get(name) or head.default_loss() for name, head in self.heads.items()
        }
        weights = {**recorded, **(head_weights or {})}
        self.head_weights: dict[str, float] = {name: float(weights.get(name, 1.0)) for name in self.heads}
        self.outputs: dict[str, list[HeadOutput]] = {name: [] for name in self.heads}
        self._terms: dict[str, list[dict[str, Tensor]]] = {name: [] for name in self.heads}  # per recorded output
        self._main: dict[str, list[str]] = {name: [] for name in self.heads}  # is its main term in: with a gradient?
        self._names = {id(h): name for name, h in self.heads.items()}
        if optimizer is not None and not is_tracing():
            check_optimizer(model, optimizer)

    def __enter__(self) -> Supervision:
        for head in self.heads.values():
            if head._supervisor is not None:
                raise RuntimeError("supervise() blocks cannot be nested on the same head")
            head._supervisor = self
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for head in self.heads.values():
            head._supervisor = None

    def record(self, head: AdaptiveHead, out: HeadOutput) -> None:
        """Keep a head's training output and compute its extra loss terms now, as the head returns: before the
        model upsamples its logits and takes its own cross-entropy, so the full-resolution temporaries of the
        terms (one upsampled ``[T·B, n, H, W]`` stack at a time) come and go below the step's peak."""
        name = self._names[id(head)]
        loss_fn = self.loss_fns[name]
        self.outputs[name].append(out)
        self._terms[name].append(loss_fn.terms(out, self.target, skip={loss_fn.main_term}))
        self._main[name].append("none")

    def _computed_terms(self, main: str) -> dict[str, list[dict[str, Tensor]]]:
        """Every recorded output's terms (the extra ones computed as it was recorded); with ``main="value"`` also
        each head's main term for reporting (no gradient), with ``"grad"`` with one, each computed once."""
        for name, outs in self.outputs.items():
            loss_fn = self.loss_fns[name]
            main_term = loss_fn.main_term
            cached, mains = self._terms[name], self._main[name]
            for i, out in enumerate(outs):
                if main == "none" or mains[i] in (main, "grad"):
                    continue  # not asked for, or already computed (with a gradient if that was asked)
                others = set(loss_fn.weights) - {main_term}
                with torch.set_grad_enabled(main == "grad" and torch.is_grad_enabled()):
                    cached[i].update(loss_fn.terms(out, self.target, skip=others))
                mains[i] = main
        return self._terms

    def losses(self, include_main: bool = False) -> dict[str, Tensor]:
        """Every recorded head's named loss terms as ``{"<head path>.<term>": value}`` plus ``"adaptive_loss"``.

        ``"adaptive_loss"`` (what :meth:`loss` returns; not ``"loss"``, which in a loss module's dict includes the
        main CE) sums the weighted terms of every head and every recorded call, each head's scaled by its
        :attr:`head_weights`; the main CE of each head is left out of it unless ``include_main`` (the terms
        themselves are reported, unscaled: each head's main term, without a gradient unless ``include_main``, and
        every term with a non-zero weight). The terms are computed once per forward: :meth:`loss` and
        :meth:`losses` share them.
        """
        return self._losses(include_main, report=True)

    def _losses(self, include_main: bool, report: bool) -> dict[str, Tensor]:
        computed = self._computed_terms("grad" if include_main else "value" if report else "none")
        result: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, outs in computed.items():
            loss_fn = self.loss_fns[name]
            for i, (out, cached) in enumerate(zip(self.outputs[name], outs, strict=True)):
                terms = cached
                exclude = () if include_main else (loss_fn.main_term,)
                part = loss_fn.combine(terms, exclude=exclude, anchor=out.logits)
                if self.head_weights[name] != 1:
                    part = self.head_weights[name] * part
                total = part if total is None else total + part
                suffix = "" if len(outs) == 1 else f"[{i}]"
                if report:
                    result.update({f"{name}{suffix}.{k}": v for k, v in terms.items()})
        if total is None:
            raise RuntimeError(
                "no adaptive head ran in training mode inside the supervise() block "
                "(is the model in train() mode and was it called inside the block?)"
            )
        result["adaptive_loss"] = total
        return result

    def loss(self, include_main: bool = False) -> Tensor:
        """The weighted sum of the extra loss terms of every adaptive head (see :meth:`losses`); computes no term
        it does not sum (the main CE only with ``include_main``)."""
        return self._losses(include_main, report=False)["adaptive_loss"]


def supervise(
    model: nn.Module,
    target: Tensor,
    loss_fns: HeadLoss[Any] | Mapping[str, HeadLoss[Any]] | None = None,
    head_weights: Mapping[str, float] | None = None,
    *,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
) -> Supervision:
    """Give ``target [B, H, W]`` to every adaptive head of ``model`` inside a ``with`` block.

    Args:
        model: any module containing :class:`~adaptive_heads.head.AdaptiveHead` submodules.
        target: the label map of the batch (any resolution; heads resize it themselves).
        loss_fns: one loss module for all heads, or ``{head path: loss module}``; default: each head's
            ``default_loss()``.
        head_weights: ``{head path: weight}`` of each head's share of ``sup.loss()``; default: the host
            library's auxiliary-loss weight for an auxiliary head replaced by
            :func:`~adaptive_heads.replace_classifier` (``model.adaptive_head_weights``), 1 otherwise.
        optimizer: the optimizer (or optimizers) of the training step: :func:`check_optimizer` raises a
            ``ValueError`` if they do not hold every head's trainable parameters (one built before
            ``replace_classifier``), before anything runs. A set lookup per parameter, on the host; skipped while
            ``torch.compile`` traces.

    Example:
        >>> from adaptive_heads import ContextAwareClassifier, replace_classifier
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 5, 1))
        >>> model = replace_classifier(model, ContextAwareClassifier, num_classes=5)
        >>> images, target = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2, 8, 8))
        >>> with supervise(model, target) as sup:
        ...     logits = model(images)  # the model's own forward, untouched
        ...     loss = torch.nn.functional.cross_entropy(logits, target) + sup.loss()
        >>> loss.backward()
        >>> sorted(sup.losses())
        ['1.ce', '1.ce_coarse', '1.ce_teacher', '1.distill', 'adaptive_loss']
    """
    return Supervision(model, target, loss_fns, head_weights, optimizer)


def _held_parameters(optimizer: object) -> set[int]:
    """The ids of the parameters an optimizer updates: those of its ``param_groups``, or of the per-parameter
    optimizers of HF's layer-wise optimizers (``optimizer_dict``, whose ``param_groups`` hold a placeholder)."""
    per_parameter = getattr(optimizer, "optimizer_dict", None)
    if isinstance(per_parameter, Mapping):
        return {id(p) for p in per_parameter}
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, Sequence) or isinstance(groups, str):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (param_groups), got {type(optimizer).__name__}")
    return {id(p) for group in groups for p in group["params"]}


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]) -> None:
    """Raise if the optimizer(s) do not hold every trainable parameter of ``model``'s adaptive heads.

    The trap it catches: an optimizer built before :func:`~adaptive_heads.replace_classifier` holds the replaced
    conv's parameters, not the head's, and the model trains on without the head, unnoticed (a fused or foreach
    optimizer as well as a plain one). It compares the parameters themselves with the optimizers'
    ``param_groups`` (HF's layer-wise optimizers: their per-parameter optimizers). Frozen parameters
    (``requires_grad=False``) need not be there. :func:`supervise` runs it when given ``optimizer=``;
    :class:`~adaptive_heads.integrations.hf.AdaptiveTrainer` runs it on the optimizer it trains with. Under FSDP
    with flattened parameters (``use_orig_params=False``) the heads hold no parameters of their own and there is
    nothing to compare.

    Args:
        model: a model holding adaptive heads (or a head itself).
        optimizer: a ``torch.optim.Optimizer`` (or an object with its ``param_groups``), or several (a head with
            an optimizer of its own, Lightning's manual optimisation): every head's parameters must be in one of them.

    Raises:
        ValueError: naming each head path and how many of its trainable parameters the optimizers lack.
        TypeError: an optimizer has no ``param_groups``.

    Example:
        >>> from adaptive_heads import replace_classifier
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 5, 1))
        >>> early = torch.optim.SGD(model.parameters(), lr=0.1)  # holds the conv about to be replaced
        >>> model = replace_classifier(model, "cac", num_classes=5)
        >>> check_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))  # built after: nothing to say
        >>> check_optimizer(model, early)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the optimizer does not hold the trainable parameters of the adaptive head(s) ['1' (0 of 8)]...
    """
    try:
        optimizers = [optimizer] if hasattr(optimizer, "param_groups") else list(optimizer)
    except TypeError:
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or several, got {type(optimizer).__name__}"
        ) from None
    held = set().union(*(_held_parameters(o) for o in optimizers))
    lacking: list[str] = []
    for path, head in model.named_modules():
        if isinstance(head, AdaptiveHead):
            params = [p for p in head.parameters() if p.requires_grad]
            held_here = sum(id(p) in held for p in params)
            if held_here < len(params):
                lacking.append(f"{path or type(head).__name__!r} ({held_here} of {len(params)})")
    if lacking:
        raise ValueError(
            f"the optimizer does not hold the trainable parameters of the adaptive head(s) [{', '.join(lacking)}]: "
            "those heads would never train. An optimizer built before replace_classifier() holds the replaced "
            "conv's parameters: build it after, or add the heads' parameters to it (optimizer.add_param_group)"
        )
