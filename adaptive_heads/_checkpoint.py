"""Loading a head's weights out of an official (whole-model) checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

__all__ = ["load_prefixed_state_dict"]


def _unwrap(checkpoint: Mapping[str, object]) -> Mapping[str, Tensor]:
    for key in ("state_dict", "model", "state_dict_ema"):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            return inner
    return checkpoint  # type: ignore[return-value]


_EXTRA_STATE = "_extra_state"


def load_prefixed_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, object],
    *,
    prefix: str | None,
    candidates: Iterable[str],
    strict: bool = False,
    ignored: Iterable[str] = (),
    rename: Callable[[str], str | None] | None = None,
) -> _IncompatibleKeys:
    """Load the keys of ``state_dict`` under ``prefix`` into ``module``.

    Args:
        module: the head.
        state_dict: a whole-model state dict (a checkpoint dict with ``"state_dict"``/``"model"`` also works).
        prefix: the head's key prefix; ``None`` picks, among ``candidates`` (each also tried behind a
            DDP ``module.``), the one matching most of the module's keys.
        strict: raise ``KeyError`` if any of the module's keys is missing.
        ignored: sub-keys (after the prefix) that are silently skipped (e.g. unused buffers).
        rename: maps a sub-key to the module's key, or ``None`` to skip it.

    Returns:
        ``_IncompatibleKeys(missing_keys, unexpected_keys)`` with keys relative to the prefix.
    """
    flat = _unwrap(state_dict)
    # official checkpoints hold weights only: a head's saved options (its ``_extra_state``) are neither expected
    # nor read here; the head's own stand in for them, so its load has nothing to check and nothing to warn about
    full = module.state_dict()
    own = {k: v for k, v in full.items() if not k.endswith(_EXTRA_STATE)}
    if prefix is None:
        options = [p for c in candidates for p in (c, "module." + c)]
        scores = [sum((p + k) in flat for k in own) for p in options]
        best = max(range(len(options)), key=lambda i: scores[i])
        if scores[best] == 0:
            raise KeyError(
                f"no key of this head found in the state dict under any of the prefixes {options}; "
                "pass prefix= explicitly"
            )
        prefix = options[best]
    skip = set(ignored)
    picked: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        sub = key[len(prefix) :]
        if sub in skip or sub.endswith(_EXTRA_STATE):
            continue
        if rename is not None:
            renamed = rename(sub)
            if renamed is None:
                continue
            sub = renamed
        if sub in own:
            picked[sub] = value
        elif prefix or "." not in sub or sub.split(".")[0] in dict(module.named_children()):
            unexpected.append(sub)
    missing = [k for k in own if k not in picked]
    if strict and missing:
        raise KeyError(f"missing keys for {type(module).__name__} under prefix {prefix!r}: {missing}")
    module.load_state_dict({**picked, **{k: v for k, v in full.items() if k.endswith(_EXTRA_STATE)}}, strict=False)
    return _IncompatibleKeys(missing, unexpected)
