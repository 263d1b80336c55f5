"""A head's class and options saved beside its weights, so that a checkpoint cannot load into a head built
differently without a word, and never at the cost of a weight that fits.

``AdaptiveHead.get_extra_state`` stores ``{"format", "head", "in_channels", "num_classes", "options"}`` as JSON in
a uint8 tensor of fixed length :data:`SIZE` (PyTorch's per-module extra state, key ``<prefix>_extra_state``: a
tensor, so ``torch.save`` of a bare state dict, ``weights_only`` loads, safetensors and Hugging Face
``save_pretrained`` keep it; one length for every head, so distributed checkpointing and shape-filtering recipes
treat it as any other entry). Why an entry and not a config file: docs/checkpoints.md. On load, every tensor whose
shape fits is copied first, as for any module; then the record is compared with the head:

- the entry is optional: a state dict without it (saved by 0.1, filtered to parameters) loads, with a warning that
  the options could not be checked;
- a different class count or channel count (fine-tuning onto another dataset) says nothing more than PyTorch's
  own report of the tensors whose shapes differ (a shape-filtered state dict loads without a word);
- a different head class or *function option* (what the weights compute: ``tau``, ``eps``, ``kernel_size``,
  ``projection_norm``...): a warning naming each option and both values, and the entry is reported as an
  *unexpected key*, so ``load_state_dict(strict=True)`` raises on it (mmengine's ``load_checkpoint`` likewise: it
  logs it with ``strict=False``) and ``strict=False`` loads (a module's ``_load_from_state_dict`` is always called
  with ``strict=True``: the caller's ``strict`` acts on the missing and unexpected keys only);
- a different *training option* (``dropout``, ``teacher_pooling``, ``gamma``...): a warning naming it; the head
  keeps its own value (fine-tuning with another dropout is legitimate; resuming is then not exact);
- options with no effect on the numbers (``init_std``, ``sync``, ``checkpoint_embedding``) are not compared;
- a record that cannot be read (a newer format, corrupt bytes): the same, the warning naming the key, the format
  and what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .head import AdaptiveHead

__all__ = ["FORMAT", "SIZE", "OptionChanges", "compare_saved_options", "decode_saved_options", "encode_saved_options"]

#: the record's layout; a reader refuses a newer one (it cannot know what the new fields mean)
FORMAT = 1
#: bytes of the saved record (zero-padded): room for four times the longest options of today's heads
SIZE = 1024
_FIELDS = ("head", "in_channels", "num_classes", "options")


def _family(head: AdaptiveHead) -> str:
    """The library class a head is (a user's subclass counts as the library head it extends)."""
    for cls in type(head).__mro__:
        if cls.__module__.startswith("adaptive_heads."):
            return cls.__name__
    return type(head).__name__  # pragma: no cover - every head derives from AdaptiveHead


def encode_saved_options(head: AdaptiveHead) -> Tensor:
    """``[SIZE]`` uint8 on the CPU (also under a meta-device context): the zero-padded JSON record of the head's
    class, shape and :meth:`~AdaptiveHead.options`."""
    record = {
        "format": FORMAT,
        "head": _family(head),
        "in_channels": head.in_channels,
        "num_classes": head.num_classes,
        "options": head.options(),
    }
    data = json.dumps(record, sort_keys=True).encode()
    if len(data) > SIZE:
        raise ValueError(f"{type(head).__name__}'s options take {len(data)} bytes of JSON, more than the {SIZE} saved")
    return torch.tensor(list(data.ljust(SIZE, b"\0")), dtype=torch.uint8, device="cpu")


def decode_saved_options(saved: object, key: str = "_extra_state") -> dict[str, Any]:
    """The record :func:`encode_saved_options` wrote, from a 1-D tensor of byte values of any dtype (a state dict
    cast to half keeps them exact) on any device.

    Raises:
        ValueError: naming ``key``, the record's format and what to do, when the record is of a newer format than
            this version reads or cannot be read at all.
    """
    remedy = (
        f"load the weights without it by deleting {key!r} from the state dict (strict=False also loads them, with a "
        "warning); the options are then not checked"
    )
    if not isinstance(saved, Tensor) or saved.dim() != 1 or saved.is_complex() or saved.is_meta:
        shape = tuple(saved.shape) if isinstance(saved, Tensor) else type(saved).__name__
        raise ValueError(
            f"{key}: the head's saved options are not a 1-D tensor of bytes (got {shape}, format unknown): {remedy}"
        )
    values = saved.detach().cpu().double()
    if values.numel() and (values.min() < 0 or values.max() > 255 or not torch.equal(values, values.round())):
        raise ValueError(f"{key}: the head's saved options hold values that are not bytes (format unknown): {remedy}")
    data = bytes(values.to(torch.uint8).tolist()).rstrip(b"\0")
    try:
        record = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{key}: the head's saved options are not the JSON record adaptive_heads writes ({error}; format unknown): "
            f"{remedy}"
        ) from None
    version = record.get("format") if isinstance(record, dict) else None
    if isinstance(version, int) and version > FORMAT:
        raise ValueError(
            f"{key}: the head's saved options are of format {version}, written by a newer adaptive_heads; this version "
            f"reads format {FORMAT}: upgrade adaptive_heads, or {remedy}"
        )
    if version != FORMAT or not all(name in record for name in _FIELDS) or not isinstance(record["options"], dict):
        raise ValueError(
            f"{key}: the head's saved options are an incomplete record (format {version!r}, fields "
            f"{sorted(record) if isinstance(record, dict) else type(record).__name__}; format {FORMAT} has "
            f"{['format', *_FIELDS]}): {remedy}"
        )
    return record


@dataclass
class OptionChanges:
    """How a saved record differs from a head: each dict maps a name to ``(saved, this head's)``."""

    saved_head: str
    head: str
    shape: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    function: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    training: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    saved_options: dict[str, Any] = field(default_factory=dict)

    @property
    def computes_otherwise(self) -> bool:
        """Another head class or function option: the saved weights compute other logits in this head."""
        return self.saved_head != self.head or bool(self.function)

    def describe(self, where: str) -> str:
        """What differs in head class or function options, and how to load the weights as trained."""
        if self.saved_head != self.head:
            what = f"the checkpoint holds a {self.saved_head}'s weights, this is a {self.head}"
            rebuild = f"build a {self.saved_head} with the saved options {self.saved_options}"
        else:
            listed = ", ".join(f"{k}={old!r} (this head: {new!r})" for k, (old, new) in self.function.items())
            what = f"the checkpoint was saved from a {self.head} built with {listed}"
            rebuild = "build the head with " + ", ".join(f"{k}={old!r}" for k, (old, _) in self.function.items())
            rebuild += f" (as saved: {self.saved_options})"
        return (
            f"{where}: {what}; its weights compute other logits with this head's options. To use them as "
            f"trained, {rebuild}"
        )

    def describe_training(self, where: str) -> str | None:
        """The warning that only training options differ (the head keeps its own), else ``None``."""
        if not self.training:
            return None
        listed = ", ".join(f"{k}={old!r} (kept: {new!r})" for k, (old, new) in self.training.items())
        return (
            f"{where}: the checkpoint was trained with {listed}; the weights load and this {self.head} keeps its own "
            "values, so continued training differs from the saved run"
        )


def compare_saved_options(head: AdaptiveHead, record: dict[str, Any]) -> OptionChanges:
    """How the decoded ``record`` differs from ``head`` (options absent from either side are not compared)."""
    changes = OptionChanges(saved_head=str(record["head"]), head=_family(head), saved_options=record["options"])
    for name, value in (("in_channels", head.in_channels), ("num_classes", head.num_classes)):
        if record[name] != value:
            changes.shape[name] = (record[name], value)
    if changes.saved_head != changes.head:
        return changes  # other options mean other things: the class is the difference
    saved = record["options"]
    for name, value in head.options().items():
        if name in head.free_options or name not in saved or saved[name] == value:
            continue
        kind = changes.training if name in head.training_options else changes.function
        kind[name] = (saved[name], value)
    return changes
