"""Optional integrations with segmentation libraries; each submodule imports its library lazily.

- :mod:`adaptive_heads.integrations.hf` — HF transformers semantic-segmentation models
  (``AdaptiveSegmentationModel``: ``model(pixel_values, labels=...)`` returns the adaptive loss).

- :mod:`adaptive_heads.integrations.mmseg` — mmseg 1.x config plugin (``Adaptive<Head>`` decode heads,
  ``AdaptiveEncoderDecoder``); :mod:`adaptive_heads.integrations.mmcv_lite` lets it import on ``mmcv-lite``.

torchvision and segmentation_models_pytorch models need no wrapper: ``replace_classifier`` knows their
classifier paths and ``supervise`` passes the labels (see the README).
"""
