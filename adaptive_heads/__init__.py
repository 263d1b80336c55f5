"""adaptive_heads: drop-in adaptive pixel classifiers for semantic segmentation.

Swap the final ``nn.Conv2d(C, n, 1)`` of a segmentation model for

- :class:`ContextAwareClassifier` (CAC, Tian et al., AAAI 2023) + :class:`ContextAwareLoss`,
- :class:`SSAClassifier` (SSA-Seg, Ma et al., NeurIPS 2024) + :class:`SSALoss`,
- :class:`PrototypeClassifier` (ProtoSeg, Zhou et al., CVPR 2022) + :class:`PrototypeLoss`,

and train it with :func:`supervise` (labels side channel) or by calling the head directly.
"""

from . import functional
from .base import AdaptiveHead, HeadLoss, HeadOutput
from .cac import CACOutput, ContextAwareClassifier
from .cac_loss import ContextAwareLoss, context_aware_distillation, context_aware_loss
from .protoseg import PrototypeClassifier, PrototypeOutput
from .protoseg_loss import PrototypeLoss, prototype_loss
from .replace import find_classifier, replace_classifier
from .ssa import SSAClassifier, SSAOutput
from .ssa_loss import SSALoss, ssa_loss
from .supervise import Supervision, supervise
from .validation import set_debug

__version__ = "0.1.0"

__all__ = [
    "AdaptiveHead",
    "CACOutput",
    "ContextAwareClassifier",
    "ContextAwareLoss",
    "HeadLoss",
    "HeadOutput",
    "PrototypeClassifier",
    "PrototypeLoss",
    "PrototypeOutput",
    "SSAClassifier",
    "SSALoss",
    "SSAOutput",
    "Supervision",
    "context_aware_distillation",
    "context_aware_loss",
    "find_classifier",
    "functional",
    "prototype_loss",
    "replace_classifier",
    "set_debug",
    "ssa_loss",
    "supervise",
]
