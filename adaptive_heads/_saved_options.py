"""A head's class and options saved in its state dict, so that a checkpoint cannot load into a head built
differently without a word.

``AdaptiveHead.get_extra_state`` stores ``{"head", "in_channels", "num_classes", "options"}`` as JSON in a uint8
tensor of fixed length :data:`SIZE` (PyTorch's per-module extra state, key ``<prefix>_extra_state``: a tensor, so
safetensors and Hugging Face ``save_pretrained`` keep it; one length for every head, so distributed checkpointing
and shape-filtering recipes treat it as any other entry). On load:

- a different head class, shape or *function option* (what the weights compute: ``tau``, ``eps``,
  ``kernel_size``, ``projection_norm``...) is an error naming each option and both values, reported as PyTorch
  reports a size mismatch: none of the head's weights is copied, ``load_state_dict`` raises after the walk
  (mmengine's ``load_state_dict(strict=False)`` logs it instead, as it does for a size mismatch);
- a different *training option* (``dropout``, ``teacher_pooling``, ``gamma``...) loads with a warning naming
  it: the head keeps its own value (fine-tuning with another dropout is legitimate; resuming is then not exact);
- options with no effect on the numbers (``init_std``, ``sync``, ``checkpoint_embedding``) are not compared.

A state dict without the entry (official checkpoints, which load through ``load_official_state_dict``; state dicts
filtered by hand) loads with ``strict=False`` as before.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .head import AdaptiveHead

__all__ = ["SIZE", "decode_saved_options", "encode_saved_options", "option_mismatch", "training_changes"]

FORMAT = 1
#: bytes of the saved record (zero-padded): room for four times the longest options of today's heads
SIZE = 1024


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


def decode_saved_options(saved: object) -> dict[str, Any]:
    """The record :func:`encode_saved_options` wrote, from a 1-D tensor of byte values of any dtype (a state dict
    cast to half keeps them exact) on any device."""
    if not isinstance(saved, Tensor) or saved.dim() != 1 or saved.is_complex():
        raise TypeError(f"a head's saved options must be a 1-D tensor of bytes, got {type(saved).__name__}")
    data = bytes(saved.detach().cpu().round().to(torch.uint8).tolist()).rstrip(b"\0")
    return json.loads(data.decode())


def option_mismatch(head: AdaptiveHead, saved: object, where: str) -> str | None:
    """The error when the checkpoint's head differs from ``head`` in class, shape or a function option, else
    ``None`` (``where`` names the module)."""
    record = decode_saved_options(saved)
    name = type(head).__name__
    if record["head"] != _family(head):
        return f"{where}: the checkpoint holds a {record['head']}'s weights, this is a {name}"
    shape = {"in_channels": head.in_channels, "num_classes": head.num_classes}
    saved_options, own = record["options"], head.options()
    differ = {k: (record[k], v) for k, v in shape.items() if record[k] != v}
    differ |= {
        k: (saved_options.get(k), v)
        for k, v in own.items()
        if k not in head.training_options and k not in head.free_options and saved_options.get(k, v) != v
    }
    if not differ:
        return None
    listed = ", ".join(f"{k}={old!r} (this head: {new!r})" for k, (old, new) in differ.items())
    rebuild = ", ".join(f"{k}={old!r}" for k, (old, _) in differ.items())
    return (
        f"{where}: the checkpoint was saved from a {name} built with {listed}; its weights compute other logits "
        f"with this head's options. Build the head with {rebuild} (as saved: {record['options']}) before loading"
    )


def training_changes(head: AdaptiveHead, saved: object, where: str) -> str | None:
    """The warning when only training options differ (the head keeps its own), else ``None``."""
    saved_options, own = decode_saved_options(saved)["options"], head.options()
    training = {k: (saved_options[k], v) for k, v in own.items() if k in head.training_options
                and k in saved_options and saved_options[k] != v}  # fmt: skip
    if not training:
        return None
    listed = ", ".join(f"{k}={old!r} (kept: {new!r})" for k, (old, new) in training.items())
    return (
        f"{where}: the checkpoint was trained with {listed}; the weights load and this {type(head).__name__} keeps "
        "its own values, so continued training differs from the saved run"
    )
