"""The stateless math of the adaptive heads: tensor in, tensor out, no parameters, no module state.

Notation used in all docstrings: ``B`` images, ``C`` feature channels, ``n`` classes, ``h×w`` feature resolution
(``N = h·w`` pixels), ``H×W`` label resolution, ``K`` prototypes per class, ``D`` embedding channels.

Everything here is loop-free over classes and images and free of host synchronisation, so it runs unchanged on
CPU and CUDA, under ``torch.compile`` and ``torch.export``. Reductions over pixels (pooling, the cosine
normaliser, soft-maxes feeding a pooling, Sinkhorn) run in float32 even under autocast and for half inputs: a
sum over 400k pixels overflows float16.

- :mod:`.pooling` — class-wise soft and hard pooling of features;
- :mod:`.cosine` — cosine logits, the channel norm, the 1×1 conv as a matmul;
- :mod:`.labels` — nearest label resizing, OpenCV's Canny, the boundary band;
- :mod:`.reductions`, :mod:`.distillation`, :mod:`.dice` — the loss terms of CAC and SSA-Seg;
- :mod:`.upsampled` — cross-entropy and sigmoid statistics at label resolution without the full-size copy;
- :mod:`.sinkhorn`, :mod:`.embedding`, :mod:`.prototypes` — ProtoSeg's clustering, pixel embedding tail and
  pixel–prototype similarities.
"""

from __future__ import annotations

from .cosine import channel_norm, cosine_logits, pointwise_conv
from .dice import sigmoid_dice_loss, sigmoid_dice_losses
from .distillation import (
    boundary_distillation,
    context_aware_distillation,
    position_distillation,
    relation_distillation,
    soft_distillation,
)
from .embedding import unit_layer_norm
from .labels import canny_edges, label_boundary, resize_labels_nearest, valid_labels
from .pooling import (
    class_means,
    class_pixel_counts,
    class_sums,
    hard_class_pool,
    label_one_hot,
    soft_class_pool,
    soft_class_sums,
)
from .prototypes import (
    classwise_kmeans,
    prototype_best_similarity,
    prototype_contrast_from_stats,
    prototype_contrast_sums,
    prototype_similarity_stats,
)
from .reductions import classwise_weighted_mean
from .sinkhorn import classwise_sinkhorn
from .upsampled import (
    bilinear_source_rows,
    upsampled_cross_entropy,
    upsampled_cross_entropy_sums,
    upsampled_sigmoid_loss,
    upsampled_sigmoid_stats,
)

__all__ = [
    "bilinear_source_rows",
    "boundary_distillation",
    "canny_edges",
    "channel_norm",
    "class_means",
    "class_pixel_counts",
    "class_sums",
    "classwise_kmeans",
    "classwise_sinkhorn",
    "classwise_weighted_mean",
    "context_aware_distillation",
    "cosine_logits",
    "hard_class_pool",
    "label_boundary",
    "label_one_hot",
    "pointwise_conv",
    "position_distillation",
    "prototype_best_similarity",
    "prototype_contrast_from_stats",
    "prototype_contrast_sums",
    "prototype_similarity_stats",
    "relation_distillation",
    "resize_labels_nearest",
    "sigmoid_dice_loss",
    "sigmoid_dice_losses",
    "soft_class_pool",
    "soft_class_sums",
    "soft_distillation",
    "unit_layer_norm",
    "upsampled_cross_entropy",
    "upsampled_cross_entropy_sums",
    "upsampled_sigmoid_loss",
    "upsampled_sigmoid_stats",
    "valid_labels",
]
