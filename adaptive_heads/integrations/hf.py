"""HF transformers: adaptive heads inside ``*ForSemanticSegmentation`` models.

HF segmentation models compute their own cross-entropy inside ``forward(pixel_values, labels=...)`` and never
pass the labels to the classifier. :class:`AdaptiveSegmentationModel` swaps the classifier for an adaptive head
and, in training with labels, runs the model inside :func:`~adaptive_heads.supervise`, so
``model(pixel_values, labels=labels).loss`` is the model's own loss plus the head's extra terms::

    from transformers import SegformerForSemanticSegmentation
    from adaptive_heads import ContextAwareClassifier
    from adaptive_heads.integrations.hf import AdaptiveSegmentationModel

    model = AdaptiveSegmentationModel(SegformerForSemanticSegmentation(config), ContextAwareClassifier)
    out = model(pixel_values=images, labels=labels)   # out.loss includes the adaptive terms
    out.loss.backward()

    model.save_pretrained("my-model")                  # config.json (with the heads) + model.safetensors
    model = AdaptiveSegmentationModel.from_pretrained("my-model")

It trains with ``transformers.Trainer`` (``Trainer(model=model, ...)``: its inputs are ``pixel_values`` and
``labels``); :class:`AdaptiveTrainer` also logs each loss term beside the total. Save the result with
``model.save_pretrained``: for a model that is not a ``PreTrainedModel``, ``Trainer.save_model`` writes only a
state dict. A plain ``SegformerForSemanticSegmentation.from_pretrained`` of a
saved folder loads everything but the classifier, which it initialises afresh (transformers reports its keys as
missing and the adaptive head's as unexpected): load such folders with
:meth:`AdaptiveSegmentationModel.from_pretrained`.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import transformers
from torch import Tensor, nn

from .. import __version__
from ..head import AdaptiveHead
from ..losses import HeadLoss
from ..registry import head_by_name
from ..replace import replace_classifier
from ..supervise import check_optimizer, supervise

__all__ = ["CONFIG_KEY", "AdaptiveSegmentationModel", "AdaptiveTrainer"]

#: the config attributes HF segmentation models read their loss's ignore_index from
_IGNORE_INDEX_ATTRS = ("semantic_loss_ignore_index", "loss_ignore_index")

#: the key of the saved ``config.json`` that records the adaptive heads (their paths, kinds and options)
CONFIG_KEY = "adaptive_heads"
#: a head's saved options in a state dict (``AdaptiveHead.get_extra_state``)
_EXTRA_STATE = "_extra_state"
#: where-to-load-from options that both the config's and the model's from_pretrained take
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def _warn_of_a_plain_load_of_adaptive_weights(model: nn.Module) -> None:
    """A plain ``<HF class>.from_pretrained`` of a folder saved by :meth:`AdaptiveSegmentationModel.save_pretrained`
    keeps the config's record of the heads but initialises a plain classifier afresh at each of their paths, and
    transformers' report names the keys without saying why. Say it where such a model meets the wrapper."""
    spec = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    heads = spec.get("heads") if isinstance(spec, dict) else None
    if not isinstance(heads, dict):
        return
    plain = [path for path in heads if not isinstance(_submodule(model, path), AdaptiveHead)]
    if plain:
        warnings.warn(
            f"this {type(model).__name__} was loaded from a folder saved by AdaptiveSegmentationModel.save_pretrained "
            f"(its config.json records the adaptive heads {sorted(heads)}) by the plain transformers class: the "
            f"classifier(s) at {plain} are freshly initialised and the trained heads' weights were left unused. "
            "Load the folder with AdaptiveSegmentationModel.from_pretrained(folder)",
            UserWarning,
            stacklevel=3,
        )


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _takes_options(head: object) -> bool:
    """Whether ``head`` (a name, a head class, a ``functools.partial`` of one, or another callable) takes the heads'
    keyword options: another callable promises only ``(in_channels, num_classes)``."""
    if isinstance(head, str):
        return True
    target = head.func if isinstance(head, functools.partial) else head
    return isinstance(target, type) and issubclass(target, AdaptiveHead)


def _default_ignore_index(head: AdaptiveHead) -> object:
    parameter = inspect.signature(type(head)).parameters.get("ignore_index")
    return inspect.Parameter.empty if parameter is None else parameter.default


def _initialize_heads(model: nn.Module, keys: list[str]) -> None:
    """Each head's own initialisation for its ``keys`` transformers could not load (it gave them the model's
    ``_init_weights``, e.g. N(0, 0.02²), or left them as allocated) and for its non-persistent buffers."""
    for path, head in model.named_modules():
        if isinstance(head, AdaptiveHead):
            prefix = f"{path}." if path else ""
            head.initialize_missing([k[len(prefix) :] for k in keys if k.startswith(prefix)])


class AdaptiveSegmentationModel(nn.Module):
    """Wrap an HF semantic-segmentation model so its loss includes the adaptive heads' terms.

    Args:
        model: e.g. ``SegformerForSemanticSegmentation``, ``UperNetForSemanticSegmentation``, ``DPT...``, ``Beit...``.
        head: the head, as for :func:`~adaptive_heads.replace_classifier` (a name such as ``"cac"``, a class or a
            callable); ``None`` if the model already has one.
        include_aux: also replace the auxiliary classifier (UperNet, BEiT, DPT).
        loss_fns: loss module(s) for :func:`~adaptive_heads.supervise` (default: each head's ``default_loss()``).
        **head_options: the head's keyword options (``tau=10.0``).

    The heads the wrapper builds take ``config.semantic_loss_ignore_index`` (UperNet: ``loss_ignore_index``) as
    their ``ignore_index``, the label the model's own loss ignores; a head that ignores another label (built with
    ``ignore_index=``, or already in the model) is refused: set the config's value instead. An auxiliary head's
    extra terms are weighted by ``config.auxiliary_loss_weight``, as the model weighs its auxiliary CE. The paths
    replaced are in ``wrapper.model.adaptive_head_paths``.

    ``forward(pixel_values, labels=None, **kwargs)`` returns the model's output; in training with labels its
    ``loss`` is the model's loss plus ``sup.loss()`` (the extra terms: the model's own CE already covers each
    head's main term), and :attr:`last_losses` holds every named term (detached) for logging.

    The loss is a mean over the batch's pixels: ``transformers.Trainer`` divides it by
    ``gradient_accumulation_steps`` (:attr:`accepts_loss_kwargs` is ``False``). 4 accumulated batches of 1 give
    exactly the update and the logged loss of one batch of 4 only when every micro-batch has the same number of
    valid pixels and no term pools over the batch (tested with ``teacher_pooling="image"`` and without CAC's
    distillation); terms pooled over the batch stay batch-level, as BatchNorm's statistics do: the teacher of CAC
    and SSA-Seg (official ``teacher_pooling="batch"``) and CAC's class-wise average of its distillation.
    """

    def __init__(
        self,
        model: nn.Module,
        head: str | Callable[[int, int], AdaptiveHead] | None = None,
        *,
        include_aux: bool = False,
        loss_fns: HeadLoss[Any] | Mapping[str, HeadLoss[Any]] | None = None,
        **head_options: Any,
    ) -> None:
        super().__init__()
        _warn_of_a_plain_load_of_adaptive_weights(model)
        # the label the model's own loss ignores is the one the heads ignore (UperNet names it loss_ignore_index)
        config = getattr(model, "config", None)
        ignore_index = next((v for a in _IGNORE_INDEX_ATTRS if isinstance(v := getattr(config, a, None), int)), None)
        built: list[AdaptiveHead] = []
        if head is not None:
            chosen = {**getattr(head, "keywords", {}), **head_options}  # a functools.partial's too
            if ignore_index is not None and "ignore_index" not in chosen and _takes_options(head):
                head_options["ignore_index"] = ignore_index
            before = {id(m) for m in model.modules()}
            replace_classifier(model, head, include_aux=include_aux, **head_options)
            built = [m for m in model.modules() if isinstance(m, AdaptiveHead) and id(m) not in before]
        elif head_options:
            raise TypeError(f"head options {sorted(head_options)} given without a head")
        if not any(isinstance(m, AdaptiveHead) for m in model.modules()):
            raise ValueError('the model has no adaptive head; pass head= (e.g. "cac")')
        if ignore_index is not None:
            for module in built:  # another callable's heads: at their class's default, they take the config's
                if module.ignore_index != ignore_index and module.ignore_index == _default_ignore_index(module):
                    module.ignore_index = ignore_index
            for path, module in model.named_modules():
                if isinstance(module, AdaptiveHead) and module.ignore_index != ignore_index:
                    raise ValueError(
                        f"the head at {path!r} ignores the label {module.ignore_index} but the model's own loss "
                        f"ignores {ignore_index} (config.semantic_loss_ignore_index / loss_ignore_index): both losses "
                        "must ignore the same label; set the config's value (the heads the wrapper builds take it)"
                    )
        self.model = model
        self.loss_fns = loss_fns
        self.last_losses: dict[str, Tensor] = {}

    #: read by ``transformers.Trainer`` (>= 4.46): the loss is a mean over this batch's pixels, not a sum to be
    #: normalised by the Trainer's ``num_items_in_batch``, so under gradient accumulation the Trainer divides it by
    #: the accumulation steps. Without it, ``forward(**kwargs)`` makes the Trainer skip that division (the loss and
    #: the gradients ``gradient_accumulation_steps`` times too large).
    accepts_loss_kwargs = False

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None, **kwargs):
        # a Trainer that took **kwargs for loss kwargs (transformers 4.46-4.47 read the signature, not
        # accepts_loss_kwargs) passes num_items_in_batch: the loss here is a per-batch mean, the HF model takes none
        kwargs.pop("num_items_in_batch", None)
        if labels is None or not self.training:
            return self.model(pixel_values=pixel_values, labels=labels, **kwargs)
        with supervise(self.model, labels, self.loss_fns) as sup:
            out = self.model(pixel_values=pixel_values, labels=labels, **kwargs)
            terms = sup.losses()
        self.last_losses = {k: v.detach() for k, v in terms.items()}
        out.loss = terms["adaptive_loss"] if out.loss is None else out.loss + terms["adaptive_loss"]
        return out

    # ------------------------------------------------------------------ saving and loading
    def heads_config(self) -> dict[str, Any]:
        """What :meth:`save_pretrained` stores under ``config.adaptive_heads``: every adaptive head's path, class
        name and options (:meth:`~adaptive_heads.head.AdaptiveHead.options`), and the library version."""
        heads = {
            path: {"type": type(module).__name__, "options": module.options()}
            for path, module in self.model.named_modules()
            if isinstance(module, AdaptiveHead)
        }
        return {"version": __version__, "heads": heads}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """The wrapped model's ``save_pretrained`` (safetensors), its config extended by :meth:`heads_config`."""
        config = self.model.config
        setattr(config, CONFIG_KEY, self.heads_config())
        save = cast(Callable[..., None], self.model.save_pretrained)  # a transformers PreTrainedModel's
        try:
            save(save_directory, **kwargs)
        finally:
            delattr(config, CONFIG_KEY)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        model_class: type | None = None,
        loss_fns: HeadLoss[Any] | Mapping[str, HeadLoss[Any]] | None = None,
        **kwargs: Any,
    ) -> AdaptiveSegmentationModel:
        """Rebuild a model saved by :meth:`save_pretrained`: its HF class (``config.architectures[0]``, or
        ``model_class``) from the config, each adaptive head at its path with its options, and every weight from
        the safetensors file(s).

        ``kwargs`` are those of the HF class's ``from_pretrained``: config attributes (``num_labels=7``,
        ``id2label=...``, ``semantic_loss_ignore_index=0``: the heads take it) and loading options. Fine-tuning onto
        another class count is HF's own recipe, ``from_pretrained(folder, num_labels=7,
        ignore_mismatched_sizes=True)``: the heads are built for 7 classes, every tensor whose shape fits loads, and
        each head tensor transformers could not load (the coarse classifier, SSA-Seg's ``center_pos``, ProtoSeg's
        prototypes) gets the head's own initialisation (:meth:`~adaptive_heads.head.AdaptiveHead.initialize_missing`),
        not the model's ``_init_weights``. Any other key left unmatched is an error. Weights saved with other head
        options than ``config.json``'s load with a warning naming each (``config.json`` builds the heads); weights
        without saved options (filtered to parameters, or saved by adaptive_heads 0.1) with a warning that the options
        could not be checked.
        """
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config, model_kwargs = transformers.AutoConfig.from_pretrained(directory, return_unused_kwargs=True, **kwargs)
        spec = getattr(config, CONFIG_KEY, None)
        if not isinstance(spec, dict) or "heads" not in spec:
            raise ValueError(
                f"{directory} has no '{CONFIG_KEY}' entry in its config.json: it was not saved by "
                "AdaptiveSegmentationModel.save_pretrained (load it with its transformers class instead)"
            )
        delattr(config, CONFIG_KEY)
        if model_class is None:
            if not config.architectures:
                raise ValueError(f"{directory}/config.json names no architecture; pass model_class=")
            model_class = getattr(transformers, config.architectures[0])
        heads = spec["heads"]
        ignore_index = next((v for a in _IGNORE_INDEX_ATTRS if isinstance(v := getattr(config, a, None), int)), None)

        class WithAdaptiveHeads(model_class):  # type: ignore[misc, valid-type]
            """The HF class with the saved heads in place before transformers loads the weights (so its key
            conversions, sharding and device handling apply to them too)."""

            def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
                super().__init__(config, *args, **kwargs)
                for path, head in heads.items():
                    options = dict(head["options"])
                    overridden = ignore_index is not None and options.get("ignore_index") != ignore_index
                    if overridden:  # the config's, as the wrapper's heads take it (set for this load, on purpose)
                        options["ignore_index"] = ignore_index
                    factory = functools.partial(head_by_name(head["type"]), **options)
                    replace_classifier(self, factory, path=path, copy_weights=False)
                    if overridden:
                        self.get_submodule(path)._uncompared_options = ("ignore_index",)

        # the HF class's own name and module: transformers picks its checkpoint key conversions by them
        WithAdaptiveHeads.__name__ = WithAdaptiveHeads.__qualname__ = model_class.__name__
        WithAdaptiveHeads.__module__ = model_class.__module__
        model, info = WithAdaptiveHeads.from_pretrained(
            directory, config=config, output_loading_info=True, **hub, **model_kwargs
        )
        unchecked = sorted(k for k in info.get("missing_keys", ()) if k.endswith(_EXTRA_STATE))
        missing = [k for k in info.get("missing_keys", ()) if not k.endswith(_EXTRA_STATE)]
        for module in model.modules():  # compared again at any later load
            if isinstance(module, AdaptiveHead):
                module._uncompared_options = ()
        mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())]  # 4.x: tuples
        _initialize_heads(model, [*missing, *mismatched])
        problems = {"missing_keys": missing, "unexpected_keys": list(info.get("unexpected_keys", ()))}
        if not model_kwargs.get("ignore_mismatched_sizes"):  # fine-tuning: transformers lists them, as asked
            problems["mismatched_keys"] = mismatched
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            raise RuntimeError(f"loading {directory} left keys unmatched: {problems}")
        if unchecked:
            warnings.warn(
                f"{directory} holds no saved options for {unchecked}: the heads were built from config.json and "
                "their weights loaded, but the options they were trained with could not be checked",
                UserWarning,
                stacklevel=2,
            )
        return cls(model, loss_fns=loss_fns)


class AdaptiveTrainer(transformers.Trainer):
    """``transformers.Trainer`` that logs every loss term of the adaptive heads beside ``loss``.

    The plain ``Trainer`` logs only the total. Here each term of :attr:`AdaptiveSegmentationModel.last_losses`
    (``decode_head.classifier.ce_teacher``, ``...distill``, and ``adaptive_loss``, the heads' extra total) is
    averaged over the training steps since the previous log and added to the same log
    record, so every reporter (console, TensorBoard, W&B, ``trainer.state.log_history``) shows it. The values
    are read on the host only when a log is written. The optimizer it trains with is checked to hold every head's
    parameters (:func:`~adaptive_heads.check_optimizer`). Under data parallelism each process logs its own
    averages (the ``loss`` Trainer logs is averaged over processes, the terms are not). Under ``nn.DataParallel``
    (several GPUs in one process) the terms live on the replicas and are not logged.

    Example::

        trainer = AdaptiveTrainer(model=AdaptiveSegmentationModel(hf_model, "cac"), args=args, train_dataset=ds)
        trainer.train()
        trainer.state.log_history[0]  # {"loss": ..., "decode_head.classifier.distill": ..., ...}
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the loss is a per-batch mean whatever the transformers version decides from forward's signature (4.46 and
        # 4.47 read **kwargs as "normalises by num_items_in_batch"): the Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self._term_sums: dict[str, Tensor] = {}
        self._term_steps = 0

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's optimizer (its own, or the one given as ``optimizers=``), checked to hold every head's
        trainable parameters (:func:`~adaptive_heads.check_optimizer`: one built before the classifier was
        replaced would train the model without its heads)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if isinstance(self.model, nn.Module):
            check_optimizer(self.model, optimizer)
        return optimizer

    # **kwargs: transformers >= 4.46 passes num_items_in_batch, 4.45 does not
    def compute_loss(  # type: ignore[override]
        self, model: nn.Module, inputs: Any, return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        wrapper = self.accelerator.unwrap_model(model)  # DDP, torch.compile
        if model.training and isinstance(wrapper, AdaptiveSegmentationModel) and wrapper.last_losses:
            for name, value in wrapper.last_losses.items():
                self._term_sums[name] = self._term_sums.get(name, torch.zeros((), device=value.device)) + value.float()
            self._term_steps += 1
            wrapper.last_losses = {}  # counted once, even if this step's outputs are read again
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._term_steps and "loss" in logs:  # a training log (not an evaluation's)
            logs.update({k: round(float(v) / self._term_steps, 4) for k, v in self._term_sums.items()})
            self._term_sums, self._term_steps = {}, 0
        super().log(logs, *args, **kwargs)
