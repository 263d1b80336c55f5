"""A head's class and options saved in its state dict, so that a checkpoint cannot load into a head built
differently without a word.

``AdaptiveHead.get_extra_state`` stores ``{"head", "in_channels", "num_classes", "options"}`` as JSON in a uint8
tensor (PyTorch's per-module extra state, key ``<prefix>_extra_state``; a tensor, so safetensors and Hugging Face
``save_pretrained`` keep it). On load, before any weight is copied:

- a different head class, shape or *function option* (what the weights compute: ``tau``, ``eps``,
  ``kernel_size``, ``projection_norm``...) is refused with a ``ValueError`` naming each option and both values;
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

__all__ = ["decode_saved_options", "encode_saved_options", "refuse_other_options"]

FORMAT = 1


def _family(head: AdaptiveHead) -> str:
    """The library class a head is (a user's subclass counts as the library head it extends)."""
    for cls in type(head).__mro__:
        if cls.__module__.startswith("adaptive_heads."):
            return cls.__name__
    return type(head).__name__  # pragma: no cover - every head derives from AdaptiveHead


def encode_saved_options(head: AdaptiveHead) -> Tensor:
    """``[L]`` uint8: the JSON record of the head's class, shape and :meth:`~AdaptiveHead.options`."""
    record = {
        "format": FORMAT,
        "head": _family(head),
        "in_channels": head.in_channels,
        "num_classes": head.num_classes,
        "options": head.options(),
    }
    return torch.tensor(list(json.dumps(record, sort_keys=True).encode()), dtype=torch.uint8)


def decode_saved_options(saved: object) -> dict[str, Any]:
    """The record :func:`encode_saved_options` wrote (from a tensor on any device, or the dict itself)."""
    if isinstance(saved, dict):
        return saved
    if not isinstance(saved, Tensor) or saved.dtype != torch.uint8 or saved.dim() != 1:
        raise TypeError(f"a head's saved options must be a 1-D uint8 tensor, got {type(saved).__name__}")
    return json.loads(bytes(saved.cpu().tolist()).decode())


def refuse_other_options(head: AdaptiveHead, saved: object, where: str) -> str | None:
    """Raise ``ValueError`` if the checkpoint's head differs from ``head`` in class, shape or a function option;
    return the warning to give when training options differ (``where`` names the module in both)."""
    record = decode_saved_options(saved)
    name = type(head).__name__
    if record["head"] != _family(head):
        raise ValueError(f"{where}: the checkpoint holds a {record['head']}'s weights, this is a {name}")
    shape = {"in_channels": head.in_channels, "num_classes": head.num_classes}
    saved_options, own = record["options"], head.options()
    differ = {k: (record[k], v) for k, v in shape.items() if record[k] != v}
    differ |= {
        k: (saved_options.get(k), v)
        for k, v in own.items()
        if k not in head.training_options and k not in head.free_options and saved_options.get(k, v) != v
    }
    if differ:
        listed = ", ".join(f"{k}={old!r} (this head: {new!r})" for k, (old, new) in differ.items())
        rebuild = ", ".join(f"{k}={old!r}" for k, (old, _) in differ.items())
        raise ValueError(
            f"{where}: the checkpoint was saved from a {name} built with {listed}; its weights compute other "
            f"logits with this head's options. Build the head with {rebuild} (as saved: "
            f"{record['options']}) before loading"
        )
    training = {k: (saved_options[k], v) for k, v in own.items() if k in head.training_options
                and k in saved_options and saved_options[k] != v}  # fmt: skip
    if not training:
        return None
    listed = ", ".join(f"{k}={old!r} (kept: {new!r})" for k, (old, new) in training.items())
    return (
        f"{where}: the checkpoint was trained with {listed}; the weights load and this {name} keeps its own values, "
        "so continued training differs from the saved run"
    )
