"""mmseg on ``mmcv-lite`` (pure Python, no compiled ops): CPU machines, CI, quick experiments.

``import mmseg.models`` imports mmcv's compiled extension ``mmcv._ext`` (the ops of deformable convolution,
PointRend's ``point_sample``, CARAFE, ...), which ``mmcv-lite`` does not ship, so it fails with
``ModuleNotFoundError: No module named 'mmcv._ext'`` even for models that call none of those ops (ResNet, Swin
and MiT backbones; FCN, UPerNet, ASPP, DeepLabV3+, PSP, Segformer and OCR heads). Importing this module first
registers a stand-in for ``mmcv._ext`` whose every op raises :class:`CompiledOpUnavailable` (a ``RuntimeError``)
naming the op when called, so those models build, train and evaluate; a model that does call a compiled op
fails loudly at that call instead of computing anything wrong.
With the full mmcv (its compiled ops present) it does nothing.

:mod:`adaptive_heads.integrations.mmseg` imports this module before mmseg's models, so an mmseg config needs only the
plugin in ``custom_imports``. In Python code that imports ``mmseg.models``, ``mmseg.utils`` or ``mmcv.ops`` before
the plugin, import this module first::

    import adaptive_heads.integrations.mmcv_lite  # noqa: F401

It does not import mmseg (looking for mmcv's extension imports the ``mmcv`` package).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["CompiledOpUnavailable", "install"]

#: the name of mmcv's compiled extension module
EXTENSION = "mmcv._ext"


class CompiledOpUnavailable(RuntimeError):
    """An mmcv compiled op was called where mmcv-lite's stand-in replaces the extension."""


#: the build queries of the extension (``mmcv.utils.collect_env`` asks them): answered, not refused
_BUILD_QUERIES = ("get_compiler_version", "get_compiling_cuda_version")


def _missing_op(name: str):
    if name.startswith("__"):  # dunder look-ups (copy, pickle, inspect) see an ordinary module
        raise AttributeError(name)
    if name in _BUILD_QUERIES:
        return lambda: "n/a (mmcv-lite)"

    def op(*args: object, **kwargs: object) -> None:
        raise CompiledOpUnavailable(
            f"mmcv's compiled op {name!r} is not available: mmcv-lite has no compiled ops and "
            "adaptive_heads.integrations.mmcv_lite only lets models that need none import; install the full mmcv "
            "(the wheel built for your torch and CUDA, see docs/integrations.md, 'From mmseg') to run this model"
        )

    op.__name__ = op.__qualname__ = name
    return op


def install() -> bool:
    """Register the stand-in for ``mmcv._ext`` unless mmcv's compiled extension is installed.

    Returns:
        ``True`` if the stand-in is (now or already) in place, ``False`` if the real extension is installed (or
        mmcv is not installed, or fails to import).
    """
    present = sys.modules.get(EXTENSION)
    if present is not None:
        return getattr(present, "__adaptive_heads_stand_in__", False)
    try:
        if importlib.util.find_spec("mmcv") is None or importlib.util.find_spec(EXTENSION) is not None:
            return False  # no mmcv at all (mmseg will say so), or the full mmcv with its compiled ops
    except ImportError:  # mmcv itself fails to import (e.g. OpenCV's libGL): importing mmseg will say why
        return False
    ext = types.ModuleType(EXTENSION, "Stand-in for mmcv's compiled ops (adaptive_heads.integrations.mmcv_lite).")
    ext.__spec__ = importlib.machinery.ModuleSpec(EXTENSION, None)  # for find_spec() callers (mmengine's Config)
    ext.__getattr__ = _missing_op  # type: ignore[method-assign]
    ext.__adaptive_heads_stand_in__ = True  # type: ignore[attr-defined]
    sys.modules[EXTENSION] = ext
    return True


install()
