"""Optional integrations with segmentation libraries; each submodule imports its library lazily.

- :mod:`adaptive_heads.integrations.hf` — HF transformers semantic-segmentation models
  (``AdaptiveSegmentationModel``: ``model(pixel_values, labels=...)`` returns the adaptive loss).

- :mod:`adaptive_heads.integrations.mmseg` — mmseg 1.x config plugin (``Adaptive<Head>`` decode heads,
  ``AdaptiveEncoderDecoder``); on ``mmcv-lite`` it puts :mod:`adaptive_heads.integrations.mmcv_lite`'s stand-in for
  mmcv's compiled ops in place itself.

torchvision and segmentation_models_pytorch models need no wrapper: ``replace_classifier`` knows their
classifier paths and ``supervise`` passes the labels (see the README).
"""

from __future__ import annotations

__all__ = ["PluginImportError"]


class PluginImportError(RuntimeError):
    """A host library's modules that an integration plugin needs could not be imported (raised by
    :mod:`adaptive_heads.integrations.mmseg` when mmseg's models fail to import).

    Not an ``ImportError`` on purpose: mmengine's ``Config.fromfile`` turns an ``ImportError`` raised by a config's
    ``custom_imports`` into its own message (set ``PYTHONPATH``), and the reason would end up above it. Defined here,
    where the import always succeeds, so that code can catch it by name."""
