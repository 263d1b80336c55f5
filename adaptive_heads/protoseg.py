"""Prototype classifier (ProtoSeg) — Zhou et al., "Rethinking Semantic Segmentation: A Prototype View",
CVPR 2022.

Each class is represented by K non-learnable unit prototypes. A pixel embedding is classified by its best
cosine to each class's prototypes; during training the pixels of each class are clustered onto that class's
prototypes with Sinkhorn–Knopp (equipartition) and the prototypes follow a momentum update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys
from torch.utils.checkpoint import checkpoint

from ._checkpoint import load_prefixed_state_dict
from ._distributed import all_reduce_, is_distributed
from ._layers import ProjectionHead
from ._precision import HALF_DTYPES, upcast_half
from ._validation import check_and_split_target, check_choice, check_features, is_tracing, plain_option
from .functional import (
    classwise_kmeans,
    classwise_sinkhorn,
    prototype_best_similarity,
    prototype_similarity_stats,
    resize_labels_nearest,
    unit_layer_norm,
    valid_labels,
)
from .functional.cosine import pixel_products
from .head import AdaptiveHead
from .losses import PrototypeLoss
from .outputs import PrototypeOutput

__all__ = ["PrototypeClassifier"]

#: buffers that stay float32 (or wider) when the module is cast to a half type
_FLOAT32_BUFFERS = ("prototypes", "usage_counts")


def _same_device(generator: torch.device, device: torch.device) -> bool:
    """Whether a generator of ``generator``'s device draws on ``device``: a generator made with
    ``torch.Generator(device="cuda")`` reports ``cuda`` without an index (the current device at its creation)."""
    return generator.type == device.type and (generator.index is None or generator.index == device.index)


class PrototypeClassifier(AdaptiveHead):
    """Drop-in replacement for ``nn.Conv2d(in_channels, num_classes, 1)`` implementing ProtoSeg.

    Inference (``head(feat)`` → ``[B, n, h, w]``): ``e = L2(LayerNorm(L2(proj(feat))))`` per pixel,
    ``s_c = max_k cos(e, p_{c,k})``, logits ``= mask_norm(s)`` (LayerNorm across the n classes with learnable
    affine). The ``[N, n, K]`` similarity tensor is never materialised at inference: the max over K is taken
    one prototype slice at a time.

    Training (``head(feat, target)`` → :class:`PrototypeOutput`): the labels are nearest-resized to the
    feature map; each class's pixels are assigned to its K prototypes with class-wise Sinkhorn–Knopp
    (``sinkhorn_iters``, ``sinkhorn_eps``; see :func:`~adaptive_heads.functional.classwise_sinkhorn`); the
    Sinkhorn argmax gives the PPC/PPD targets. Then, in training mode with ``update_prototypes``, the
    prototypes (a buffer, never a Parameter) move by the momentum update
    ``p ← L2(γ·p + (1−γ)·L2(Σ assigned embeddings))``, using only **correctly classified** pixels, and only
    for prototypes that received at least one pixel. The losses use the pre-update prototypes.

    Official behaviour kept by default, and the options:

    - ``update_assignment="gumbel"`` (official): the pixels used by the update are assigned with a
      straight-through Gumbel sample of the Sinkhorn plan treated as logits (nearly uniform, so each
      prototype is pulled towards the class mean); ``"argmax"`` uses the Sinkhorn argmax (the paper).
      ``head.generator`` (a ``torch.Generator`` on the head's device) makes the Gumbel draws reproducible.
    - ``projection_norm="channel"`` (default) L2-normalises the projection over channels. The official code
      normalises over the **width** axis (``F.normalize(x, dim=-1)`` on NCHW), a bug that couples the pixels
      of a row; ``"width"`` reproduces it for official checkpoints trained that way.
    - distributed: with an initialised ``torch.distributed`` group and ``sync=True`` the Sinkhorn statistics and
      the per-prototype sums and counts are all-reduced, so every rank holds identical prototypes equal to the
      single-process update on the concatenated batch (argmax mode). The official code runs Sinkhorn per GPU
      and averages the updated prototypes; ``sync=False`` skips every collective.

    Args:
        in_channels: C.
        num_classes: n.
        num_prototypes: K per class (official 10).
        embed_dim: D (default C; official 720 = C).
        gamma: momentum (official 0.999).
        sinkhorn_iters: Sinkhorn iterations (official 3).
        sinkhorn_eps: Sinkhorn's entropic regularisation (official 0.05).
        update_prototypes: run the momentum update in training mode.
        update_assignment: ``"gumbel"`` or ``"argmax"``.
        projection_norm: ``"channel"`` or ``"width"``.
        sync: all-reduce the statistics when distributed.
        ignore_index: ignored label.
        init_std: std of the (truncated at ±2) normal init of the prototypes before normalisation.
        checkpoint_embedding: recompute the embedding path in backward: two fewer feature-size tensors held
            from forward to backward (worth it when a whole model's memory peaks at the end of its forward), for
            the embedding's forward computed twice. Off by default: for the head alone the peak falls inside
            backward, so it helps only at small sizes (docs: Performance).

    Example:
        >>> head = PrototypeClassifier(in_channels=16, num_classes=5, num_prototypes=3)
        >>> feat, target = torch.randn(2, 16, 8, 8), torch.randint(0, 5, (2, 32, 32))
        >>> losses = head.default_loss()(head(feat, target), target)  # also updates the prototypes
        >>> sorted(losses)
        ['ce', 'loss', 'ppc', 'ppd']
        >>> head.eval()(feat).shape
        torch.Size([2, 5, 8, 8])
    """

    loss_type = PrototypeLoss
    free_options = ("init_std", "sync", "checkpoint_embedding")
    prototypes: Tensor
    usage_counts: Tensor

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        num_prototypes: int = 10,
        embed_dim: int | None = None,
        gamma: float = 0.999,
        sinkhorn_iters: int = 3,
        sinkhorn_eps: float = 0.05,
        update_prototypes: bool = True,
        update_assignment: Literal["gumbel", "argmax"] = "gumbel",
        projection_norm: Literal["channel", "width"] = "channel",
        sync: bool = True,
        ignore_index: int | None = 255,
        init_std: float = 0.02,
        checkpoint_embedding: bool = False,
    ) -> None:
        super().__init__(in_channels, num_classes, ignore_index)
        in_channels, num_classes = self.in_channels, self.num_classes
        (num_prototypes, embed_dim, gamma, sinkhorn_iters, sinkhorn_eps, update_prototypes, update_assignment,
         projection_norm, sync, init_std, checkpoint_embedding) = (
            plain_option(v) for v in (num_prototypes, embed_dim, gamma, sinkhorn_iters, sinkhorn_eps,
                                      update_prototypes, update_assignment, projection_norm, sync, init_std,
                                      checkpoint_embedding)
        )  # fmt: skip
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if sinkhorn_eps <= 0 or sinkhorn_iters < 1:
            raise ValueError(f"need sinkhorn_eps > 0 and sinkhorn_iters >= 1, got {sinkhorn_eps}, {sinkhorn_iters}")
        check_choice("update_assignment", update_assignment, ("gumbel", "argmax"))
        check_choice("projection_norm", projection_norm, ("channel", "width"))
        embed_dim = in_channels if embed_dim is None else embed_dim
        self.num_prototypes = num_prototypes
        self.embed_dim = embed_dim
        self.gamma = gamma
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_eps = sinkhorn_eps
        self.update_prototypes = update_prototypes
        self.update_assignment = update_assignment
        self.projection_norm = projection_norm
        self.sync = sync
        self.checkpoint_embedding = checkpoint_embedding
        self.init_std = float(init_std)
        self.generator: torch.Generator | None = None
        self.proj_head = ProjectionHead(in_channels, embed_dim)
        self.feat_norm = nn.LayerNorm(embed_dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        prototypes = torch.empty(num_classes, num_prototypes, embed_dim)
        nn.init.trunc_normal_(prototypes, std=init_std)
        self.register_buffer("prototypes", F.normalize(prototypes, dim=-1))
        self.register_buffer("usage_counts", torch.zeros(num_classes, num_prototypes), persistent=False)

    def _apply(self, fn, recurse=True):
        """``.half()``/``.bfloat16()`` (and ``.to`` a half dtype) leave the prototype and usage buffers in float32: a
        momentum step moves a prototype by ``1 − γ = 0.1 %``, below half precision's resolution (bfloat16: 0.4 %),
        so half prototypes would never move, and half counts stop at 2048. Wider casts apply as usual."""
        kept = {name: getattr(self, name) for name in _FLOAT32_BUFFERS}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype in HALF_DTYPES:
                setattr(self, name, before.to(device=after.device, dtype=torch.float32))
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The layers as :meth:`AdaptiveHead.reset_parameters <adaptive_heads.head.AdaptiveHead.reset_parameters>`,
        then the prototypes as the constructor draws them (unit rows of a normal truncated at ±2, std ``init_std``)
        and ``usage_counts`` zero."""
        super().reset_parameters()
        fresh = torch.empty(self.prototypes.shape, device=self.prototypes.device)
        nn.init.trunc_normal_(fresh, std=self.init_std)
        self.prototypes.copy_(F.normalize(fresh, dim=-1))
        self.usage_counts.zero_()

    # ------------------------------------------------------------------ embedding and similarities
    def embed(self, feat: Tensor) -> Tensor:
        """Unit pixel embeddings ``[B, h, w, D]`` (channels last).

        Autograd keeps two feature-size tensors of this path (the ReLU output and the LayerNorm input); with
        ``checkpoint_embedding`` the path is recomputed in backward instead.
        """
        if self.checkpoint_embedding and torch.is_grad_enabled() and feat.requires_grad:
            return checkpoint(self._embed, feat, use_reentrant=False)
        return self._embed(feat)

    def _embed(self, feat: Tensor) -> Tensor:
        norm = self.feat_norm
        if self.projection_norm == "channel":
            return unit_layer_norm(self.proj_head(feat), norm.weight, norm.bias, norm.eps)
        width_normalised = F.normalize(self.proj_head(feat), p=2, dim=-1)  # the official width-axis bug
        return unit_layer_norm(width_normalised, norm.weight, norm.bias, norm.eps, normalize_input=False)

    def unit_prototypes(self) -> Tensor:
        """``[n, K, D]`` L2-normalised copy of the prototype buffer (the buffer itself is never in a graph)."""
        return F.normalize(self.prototypes, p=2, dim=-1)

    def _class_logits(self, best: Tensor, dtype: torch.dtype) -> Tensor:
        """``mask_norm`` over classes of ``[B, h, w, n]`` best cosines → ``[B, n, h, w]`` of ``dtype``.

        The LayerNorm statistics run in the cosines' dtype (float32 or wider), whatever the module's dtype."""
        norm = self.mask_norm
        weight = None if norm.weight is None else norm.weight.to(best.dtype)
        bias = None if norm.bias is None else norm.bias.to(best.dtype)
        logits = F.layer_norm(best, norm.normalized_shape, weight, bias, norm.eps)
        return rearrange(logits, "b h w n -> b n h w").to(dtype)

    def forward_logits(self, feat: Tensor) -> Tensor:
        emb = self.embed(feat)
        protos = self.unit_prototypes().to(emb.dtype)
        if is_tracing() or (torch.is_grad_enabled() and emb.requires_grad):
            rows = emb.reshape(-1, self.embed_dim)  # one K-slice at a time, no [N, n, K] tensor; the conv's policy
            best = pixel_products(rows, protos[:, 0])
            for k in range(1, self.num_prototypes):
                best = torch.maximum(best, pixel_products(rows, protos[:, k]))
            best = best.view(*emb.shape[:-1], self.num_classes)  # [B, h, w, n]
        else:  # the chunked pass training uses: one [chunk, n·K] matmul per pixel chunk
            flat = emb.reshape(-1, self.embed_dim)
            best = prototype_best_similarity(flat, protos.reshape(-1, self.embed_dim), self.num_classes)
            best = best.view(*emb.shape[:-1], self.num_classes)
        return self._class_logits(best, self.output_dtype(feat))

    # ------------------------------------------------------------------ training
    def forward_train(self, feat: Tensor, target: Tensor) -> PrototypeOutput:
        b, _, h, w = feat.shape
        n, k = self.num_classes, self.num_prototypes
        emb = self.embed(feat)  # [B, h, w, D]
        flat = emb.reshape(-1, self.embed_dim)
        protos = self.unit_prototypes().reshape(n * k, -1)
        feature_target = resize_labels_nearest(target, (h, w))
        labels = feature_target.reshape(-1)
        safe, valid = valid_labels(labels, n, self.ignore_index)
        best, own, lse = prototype_similarity_stats(flat, protos, safe, n)  # no [N, n·K] kept
        logits = self._class_logits(best.view(b, h, w, n), self.output_dtype(feat))
        with torch.no_grad():
            plan = classwise_sinkhorn(
                own.detach(), safe, n, iters=self.sinkhorn_iters, eps=self.sinkhorn_eps, sync=self.sync, valid=valid
            )
            assignment = plan.argmax(dim=1)
            slot = safe * k + assignment
            proto_target = torch.where(valid, slot, -1)
            if self.training:
                counted = valid.to(self.usage_counts.dtype)
                self.usage_counts.view(-1).index_add_(0, slot, counted)
                if self.update_prototypes:
                    correct = valid & (logits.detach().argmax(dim=1).flatten() == labels)
                    if self.update_assignment == "gumbel":
                        slot = safe * k + self._gumbel_assign(plan)
                    self._momentum_update(flat.detach(), protos, slot, correct)
        return PrototypeOutput(
            logits=logits, embeddings=flat, prototypes=protos, proto_target=proto_target,
            feature_target=feature_target, own_similarity=own, contrast_lse=lse,
        )  # fmt: skip

    def _gumbel_assign(self, plan: Tensor) -> Tensor:
        """Argmax of ``plan + Gumbel noise``: the forward value of ``gumbel_softmax(plan, hard=True)``."""
        generator = self.generator
        if generator is not None and not _same_device(generator.device, plan.device):
            raise ValueError(
                f"head.generator is a {generator.device} generator but the head runs on {plan.device}; create it "
                f"there: head.generator = torch.Generator(device={str(plan.device)!r}).manual_seed(seed)"
            )
        uniform_exponential = torch.empty(plan.shape, dtype=plan.dtype, device=plan.device)
        gumbel_neg = uniform_exponential.exponential_(generator=generator).log_()  # −G with G ~ Gumbel(0, 1)
        return (plan - gumbel_neg).argmax(dim=1)

    @torch.no_grad()
    def _momentum_update(self, emb: Tensor, protos: Tensor, slot: Tensor, use: Tensor) -> None:
        """``p ← L2(γ p + (1-γ) L2(Σ_{i→p} e_i))`` for prototypes with ≥ 1 pixel; the others stay bit-identical.

        ``protos`` are the unit prototypes of this step ``[n·K, D]``; ``slot`` the prototype of each pixel of
        ``emb [N, D]``, counted where ``use``."""
        nk = self.num_classes * self.num_prototypes
        emb = upcast_half(emb)
        sums = emb.new_zeros(nk + 1, self.embed_dim).index_add_(0, torch.where(use, slot, nk), emb)[:-1]
        counts = emb.new_zeros(nk).index_add_(0, slot, use.to(emb.dtype))
        if self.sync and is_distributed():
            all_reduce_(sums, "sum")
            all_reduce_(counts, "sum")
        current = self.prototypes.view(nk, -1)
        moved = F.normalize(torch.lerp(F.normalize(sums, dim=-1), protos.to(emb.dtype), self.gamma), dim=-1)
        current.copy_(torch.where(counts.unsqueeze(1) > 0, moved.to(current.dtype), current))

    # ------------------------------------------------------------------ prototypes from data
    @torch.no_grad()
    def init_prototypes(
        self, feat: Tensor, target: Tensor, *, iters: int = 10, generator: torch.Generator | None = None
    ) -> Tensor:
        """Set the prototypes from data: class-wise spherical k-means of the embeddings of ``feat``.

        For fitting the head onto a trained model (not in the official code, whose prototypes always start
        random): the K prototypes of each class become the centroids of that class's pixel embeddings
        (:func:`~adaptive_heads.functional.classwise_kmeans`; each pixel labelled by ``target`` nearest-resized to
        the feature map). A class with no labelled pixel keeps its prototypes. Pass features of as many training
        images as fit in memory (the decoder features the head receives, e.g. from a forward pre-hook). Under
        DDP, call it before wrapping (or on every rank with the same data): each rank fits its own prototypes
        and DDP's buffer broadcast then keeps rank 0's.

        Args:
            feat: ``[B, C, h, w]`` features.
            target: ``[B, H, W]`` labels (``ignore_index`` and other values outside ``[0, n)`` are left out).
            iters: Lloyd rounds.
            generator: for the draw of the starting pixels.

        Returns:
            ``[n]`` the labelled pixels of each class (0: that class kept its prototypes).

        Example:
            >>> head = PrototypeClassifier(16, 5, num_prototypes=3)
            >>> feat, target = torch.randn(4, 16, 8, 8), torch.randint(0, 4, (4, 32, 32))
            >>> counts = head.init_prototypes(feat, target)  # class 4 has no pixel: its prototypes stay
            >>> counts.shape, bool(counts[4] == 0), head.prototype_diversity().shape
            (torch.Size([5]), True, torch.Size([5]))
        """
        check_features(feat, self.in_channels)
        target, _ = check_and_split_target(
            target, batch_size=feat.shape[0], num_classes=self.num_classes, ignore_index=self.ignore_index,
            device=feat.device,
        )  # fmt: skip
        emb = self._embed(feat).reshape(-1, self.embed_dim)
        labels = resize_labels_nearest(target, feat.shape[-2:]).reshape(-1)
        if self.ignore_index is not None:
            labels = torch.where(labels == self.ignore_index, -1, labels)
        centroids, counts = classwise_kmeans(
            emb, labels, self.num_classes, self.num_prototypes, iters=iters, init=self.prototypes,
            generator=generator,
        )  # fmt: skip
        self.prototypes.copy_(centroids.to(self.prototypes))
        return counts

    # ------------------------------------------------------------------ diagnostics and I/O
    @torch.no_grad()
    def prototype_diversity(self) -> Tensor:
        """``[n]`` mean pairwise cosine between the K prototypes of each class (1 = collapsed; needs K ≥ 2)."""
        p = self.unit_prototypes()
        k = self.num_prototypes
        if k < 2:
            return torch.ones(self.num_classes, device=p.device)
        gram = p @ p.transpose(1, 2)  # [n, K, K]
        off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
        return off_diagonal / (k * (k - 1))

    def reset_usage(self) -> None:
        """Zero ``usage_counts`` (``[n, K]``: training pixels assigned to each prototype since the last reset)."""
        self.usage_counts.zero_()

    def load_official_state_dict(
        self, state_dict: Mapping[str, Tensor], prefix: str | None = None, strict: bool = False
    ) -> _IncompatibleKeys:
        """Load ``prototypes``, ``proj_head.proj.*``, ``feat_norm.*`` and ``mask_norm.*`` from an official
        ``HRNet_W48_Proto`` checkpoint (``module.`` prefix optional). The duplicate ``proj_head.mlp2.*`` keys are
        skipped; the backbone and ``cls_head`` belong to the user's model. Prototypes are re-normalised.

        Returns ``(missing_keys, unexpected_keys)`` like :meth:`torch.nn.Module.load_state_dict`.
        """
        own_children = {"prototypes", "proj_head", "feat_norm", "mask_norm"}

        def rename(key: str) -> str | None:
            if key.startswith("proj_head.mlp2."):
                return None
            top = key.split(".")[0]
            return key if top in own_children else None

        result = load_prefixed_state_dict(
            self, state_dict, prefix=prefix, candidates=("", "decode_head."), strict=strict, rename=rename
        )
        with torch.no_grad():
            self.prototypes.copy_(F.normalize(self.prototypes, dim=-1))
        return result

    def options(self) -> dict[str, Any]:
        names = (
            "num_prototypes", "embed_dim", "gamma", "sinkhorn_iters", "sinkhorn_eps", "update_prototypes",
            "update_assignment", "projection_norm", "sync", "checkpoint_embedding",
        )  # fmt: skip
        return {**super().options(), **{name: getattr(self, name) for name in names}}
