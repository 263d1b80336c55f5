"""Optional integrations with segmentation libraries; each submodule imports its library lazily.

- :mod:`adaptive_heads.integrations.hf` — HF transformers semantic-segmentation models
  (``AdaptiveSegmentationModel``: ``model(pixel_values, labels=...)`` returns the adaptive loss).

torchvision, segmentation_models_pytorch and mmseg 1.x models need no wrapper: ``replace_classifier`` knows their
classifier paths and ``supervise`` passes the labels (see the README).
"""
