"""adaptive_heads: drop-in adaptive pixel classifiers for semantic segmentation.

Swap the final ``nn.Conv2d(C, n, 1)`` of a segmentation model for

- :class:`ContextAwareClassifier` (CAC, Tian et al., AAAI 2023) + :class:`ContextAwareLoss`,
- :class:`SSAClassifier` (SSA-Seg, Ma et al., NeurIPS 2024) + :class:`SSALoss`,
- :class:`PrototypeClassifier` (ProtoSeg, Zhou et al., CVPR 2022) + :class:`PrototypeLoss`,

and train it with :func:`supervise` (labels side channel) or by calling the head directly. The stateless math
lives in :mod:`adaptive_heads.functional`; :data:`adaptive_heads.registry.HEADS` lists the heads.
"""

from . import functional
from ._budget import memory_budget, set_memory_budget
from ._validation import set_debug
from .cac import ContextAwareClassifier
from .checkpoints import check_state_dict
from .functional import context_aware_distillation
from .head import AdaptiveHead
from .losses import ContextAwareLoss, HeadLoss, PrototypeLoss, SSALoss
from .outputs import CACOutput, HeadOutput, PrototypeOutput, SSAOutput
from .protoseg import PrototypeClassifier
from .registry import HEADS, head_by_name
from .replace import find_classifier, replace_classifier
from .slide import slide_inference
from .ssa import SSAClassifier
from .supervise import Supervision, check_optimizer, supervise

__version__ = "1.0.0"

__all__ = [
    "HEADS",
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
    "check_optimizer",
    "check_state_dict",
    "context_aware_distillation",
    "find_classifier",
    "functional",
    "head_by_name",
    "memory_budget",
    "replace_classifier",
    "set_debug",
    "set_memory_budget",
    "slide_inference",
    "supervise",
]
