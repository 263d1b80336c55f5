"""What a head returns in training: the logits and what its loss reads."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["CACOutput", "HeadOutput", "PrototypeOutput", "SSAOutput"]


@dataclass
class HeadOutput:
    """Training output of a head. ``logits`` ``[B, n, h, w]`` is what the head predicts at inference.

    Example:
        >>> HeadOutput(logits=torch.zeros(1, 3, 4, 4)).logits.shape
        torch.Size([1, 3, 4, 4])
    """

    logits: Tensor


@dataclass
class CACOutput(HeadOutput):
    """Training output of :class:`ContextAwareClassifier`.

    Attributes:
        logits: ``p_p`` ``[B, n, h, w]``, the context-aware prediction (also the inference output).
        coarse: ``p`` ``[B, n, h, w]``, the plain 1×1-conv logits (with dropout, with bias).
        teacher: ``p_y`` ``[B, n, h, w]``, the logits of the label-built classifier (the paper's *oracle*).
        feature_target: ``[B, h, w]`` labels nearest-resized to the feature resolution.

    Example:
        >>> from adaptive_heads import ContextAwareClassifier
        >>> out = ContextAwareClassifier(16, 5)(torch.randn(2, 16, 8, 8), torch.randint(0, 5, (2, 32, 32)))
        >>> out.logits.shape, out.teacher.shape, out.feature_target.shape
        (torch.Size([2, 5, 8, 8]), torch.Size([2, 5, 8, 8]), torch.Size([2, 8, 8]))
    """

    coarse: Tensor
    teacher: Tensor
    feature_target: Tensor


@dataclass
class SSAOutput(HeadOutput):
    """Training output of :class:`SSAClassifier` (``[B, n, h, w]`` maps, ``[B, n, C]`` prototypes).

    Attributes:
        logits: the SSA (student) logits, also the inference output.
        coarse: the coarse mask ``conv_seg(dropout(feat))``.
        teacher: the online teacher's logits (not detached: its CE and dice train the ``gt_*`` layers).
        semantic: student semantic prototypes ``S_p``.
        semantic_teacher: teacher semantic prototypes ``S_p^T``.
        position: student spatial prototypes ``P_p``.
        position_teacher: teacher spatial prototypes ``P_p^T``.
        feature_target: ``[B, h, w]`` labels nearest-resized to the feature resolution.

    Example:
        >>> from adaptive_heads import SSAClassifier
        >>> out = SSAClassifier(16, 5)(torch.randn(2, 16, 8, 8), torch.randint(0, 5, (2, 32, 32)))
        >>> out.teacher.shape, out.semantic.shape, out.position_teacher.shape
        (torch.Size([2, 5, 8, 8]), torch.Size([2, 5, 16]), torch.Size([2, 5, 16]))
    """

    coarse: Tensor
    teacher: Tensor
    semantic: Tensor
    semantic_teacher: Tensor
    position: Tensor
    position_teacher: Tensor
    feature_target: Tensor


@dataclass
class PrototypeOutput(HeadOutput):
    """Training output of :class:`PrototypeClassifier`.

    Attributes:
        logits: ``[B, n, h, w]`` segmentation logits (``mask_norm`` of the per-class best cosine).
        embeddings: ``[N, D]`` unit pixel embeddings (``N = B·h·w`` in ``(b, h, w)`` order, with gradient).
        prototypes: ``[n·K, D]`` unit prototypes used for this step (pre-update copy), row ``c·K + k``.
        proto_target: ``[N]`` long, ``c·K + k`` with k the Sinkhorn assignment of the pixel within its class
            ``c``; ``-1`` for ignored pixels.
        feature_target: ``[B, h, w]`` labels nearest-resized to the feature resolution.
        own_similarity: ``[N, K]`` cosines to the prototypes of the pixel's own class (with gradient); the
            PPC/PPD target cosine is ``own_similarity[i, proto_target[i] % K]``.
        contrast_lse: ``[N]`` ``log Σ_j exp(s_ij)`` over all ``n·K`` prototype cosines (with gradient), the PPC
            normaliser at temperature 1.

    Example:
        >>> from adaptive_heads import PrototypeClassifier
        >>> out = PrototypeClassifier(16, 5, num_prototypes=3)(torch.randn(2, 16, 8, 8), torch.randint(0, 5, (2, 8, 8)))
        >>> out.embeddings.shape, out.prototypes.shape, out.proto_target.shape
        (torch.Size([128, 16]), torch.Size([15, 16]), torch.Size([128]))
    """

    embeddings: Tensor
    prototypes: Tensor
    proto_target: Tensor
    feature_target: Tensor
    own_similarity: Tensor | None = None
    contrast_lse: Tensor | None = None

    @property
    def proto_logits(self) -> Tensor:
        """``[N, n·K]`` cosine of every pixel to every prototype (the official ``contrast_logits``).

        Materialised on access; :class:`~adaptive_heads.PrototypeLoss` never builds it.
        """
        return self.embeddings @ self.prototypes.t().to(self.embeddings.dtype)
