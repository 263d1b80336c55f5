"""A head's class and options saved beside its weights, so that a checkpoint cannot load into a head built
differently without a word, and never at the cost of a weight that fits.

``AdaptiveHead.get_extra_state`` stores ``{"format", "head", "in_channels", "num_classes", "options"}`` as JSON in
a uint8 tensor of fixed length :data:`SIZE` (PyTorch's per-module extra state, key ``<prefix>_extra_state``: a
tensor, so ``torch.save`` of a bare state dict, ``weights_only`` loads, safetensors and Hugging Face
``save_pretrained`` keep it; one length for every head, so distributed checkpointing and shape-filtering recipes
treat it as any other entry). Why an entry and not a config file, and why a difference is a warning:
docs/checkpoints.md. On load, every tensor whose shape fits is copied first, as for any module; then the record is
compared with the head (:func:`compare_saved_options`): another head class or another option (except the head's
``free_options``, which change no number) is a warning naming each; the entry is optional (a state dict without it
loads with a warning); a record of a newer format or corrupt bytes is a warning naming the key, the format and what
to do. :func:`adaptive_heads.check_state_dict` raises on the same differences.
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
        f"the weights load without it (with this warning; deleting {key!r} from the state dict silences it), and the "
        "options are then not checked"
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
    options: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    saved_options: dict[str, Any] = field(default_factory=dict)

    @property
    def differs(self) -> bool:
        """Another head class or another compared option (shapes are the loader's own check)."""
        return self.saved_head != self.head or bool(self.options)

    def describe(self, where: str) -> str:
        """What differs in head class or options, and how to build the head the weights were trained in."""
        if self.saved_head != self.head:
            what = f"the checkpoint holds a {self.saved_head}'s weights, this is a {self.head}"
            rebuild = f"build a {self.saved_head} with the saved options {self.saved_options}"
        else:
            listed = ", ".join(f"{k}={old!r} (this head: {new!r})" for k, (old, new) in self.options.items())
            what = f"the checkpoint was saved from a {self.head} built with {listed}"
            rebuild = "build the head with " + ", ".join(f"{k}={old!r}" for k, (old, _) in self.options.items())
            rebuild += f" (as saved: {self.saved_options})"
        return f"{where}: {what}. To compute and train as the saved head did, {rebuild}"


def compare_saved_options(head: AdaptiveHead, record: dict[str, Any]) -> OptionChanges:
    """How the decoded ``record`` differs from ``head`` (options absent from either side, and the head's
    ``free_options``, are not compared)."""
    changes = OptionChanges(saved_head=str(record["head"]), head=_family(head), saved_options=record["options"])
    if changes.saved_head != changes.head:
        return changes  # other options mean other things: the class is the difference
    saved = record["options"]
    for name, value in head.options().items():
        skipped = name in head.free_options or name in head._uncompared_options
        if not skipped and name in saved and saved[name] != value:
            changes.options[name] = (saved[name], value)
    return changes
