"""The strict check of a state dict's saved head options, for bare state dicts (a load itself only warns)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ._saved_options import compare_saved_options, decode_saved_options
from .head import AdaptiveHead

__all__ = ["check_state_dict"]


def check_state_dict(model: nn.Module, state_dict: Mapping[str, object]) -> None:
    """Raise if a head of ``model`` was saved in ``state_dict`` with another head class or other options.

    ``model.load_state_dict(state_dict)`` loads every tensor whose shape fits and *warns* when a head's saved options
    (its ``<prefix>_extra_state`` entry) differ from the head's own: the configuration that builds a model lives
    beside its weights (HF's ``config.json``, mmseg's config, your code), and fine-tuning with other options is
    legitimate. Call this before the load where the weights must compute as they were trained (resuming, evaluating
    a checkpoint): it compares every head's record and raises before anything is copied. Options without effect on
    the numbers (``init_std``, ``sync``, ``checkpoint_embedding``) are not compared; class and channel counts are
    left to the load's own shape check. Keys are matched as ``model.state_dict()`` names them.

    Args:
        model: a model holding adaptive heads (or a head itself).
        state_dict: what ``model.load_state_dict`` would be given.

    Raises:
        ValueError: naming each head path and each option that differs (both values), each head whose record is
            missing (a state dict saved by 0.1 or filtered to parameters) or cannot be read.

    Example:
        >>> from adaptive_heads import ContextAwareClassifier
        >>> saved = ContextAwareClassifier(16, 5, tau=10.0).state_dict()
        >>> check_state_dict(ContextAwareClassifier(16, 5, tau=10.0), saved)  # the same options: nothing
        >>> try:
        ...     check_state_dict(ContextAwareClassifier(16, 5), saved)
        ... except ValueError as error:
        ...     print(str(error).partition("built with ")[2][:30])
        tau=10.0 (this head: 15.0). To
    """
    problems: list[str] = []
    for path, head in model.named_modules():
        if not isinstance(head, AdaptiveHead):
            continue
        key = f"{path}._extra_state" if path else "_extra_state"
        where = path or type(head).__name__
        if key not in state_dict:
            problems.append(f"{where}: no saved options ({key!r} is not in the state dict)")
            continue
        try:
            changes = compare_saved_options(head, decode_saved_options(state_dict[key], key))
        except ValueError as error:
            problems.append(f"{where}: {error}")
            continue
        if changes.differs:
            problems.append(changes.describe(where))
    if problems:
        raise ValueError("the state dict's head options differ from the model's: " + "; ".join(problems))
