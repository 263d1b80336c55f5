"""PrototypeClassifier and PrototypeLoss against loop references and formulas."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import PrototypeClassifier, PrototypeLoss, PrototypeOutput

from . import reference_protoseg as ref

N_CLS, C, K = 4, 6, 3


def make(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("update_assignment", "argmax")
    kw.setdefault("num_prototypes", K)
    head = PrototypeClassifier(C, N_CLS, **kw).to(dtype)
    feat = torch.randn(2, C, 5, 6, dtype=dtype)
    target = torch.randint(0, N_CLS, (2, 20, 24))
    target[0, :4] = 255
    target[target == 2] = 1  # class 2 absent
    return head, feat, target


# ----------------------------------------------------------------------------- head
def test_eval_logits_shape_and_equal_to_training_logits():
    head, feat, target = make(update_prototypes=False)
    out = head(feat, target)
    assert isinstance(out, PrototypeOutput)
    assert out.logits.shape == (2, N_CLS, 5, 6) and out.proto_logits.shape == (60, N_CLS * K)
    head.eval()
    torch.testing.assert_close(head(feat), out.logits)


def test_eval_is_nearest_prototype_with_identity_mask_norm():
    head, feat, _ = make(num_prototypes=5)
    head.eval()
    pred = head(feat).argmax(1)
    emb = head.embed(feat).reshape(-1, C)
    sims = emb @ F.normalize(head.prototypes.reshape(-1, C), dim=-1).t()
    nearest = (sims.argmax(1) // 5).view(2, 5, 6)
    assert torch.equal(pred, nearest)


def test_embedding_is_unit_and_channel_normalised():
    head, feat, _ = make()
    emb = head.embed(feat)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 5, 6))
    # per-pixel: the embedding of a pixel does not depend on its row neighbours (the official width-L2 bug does)
    feat2 = feat.clone()
    feat2[:, :, :, 0] *= 3
    torch.testing.assert_close(head.embed(feat2)[:, :, 1:], emb[:, :, 1:])
    head.projection_norm = "width"
    assert not torch.allclose(head.embed(feat2)[:, :, 1:], head.embed(feat)[:, :, 1:])


def test_targets_and_update_match_loop_reference():
    head, feat, target = make(dtype=torch.float64)
    emb = head.embed(feat).reshape(-1, C)
    with torch.no_grad():
        before = head.prototypes.clone()
        out = head(feat, target)
    seg = out.logits.permute(0, 2, 3, 1).reshape(-1, N_CLS)
    gt = F.interpolate(target[:, None].double(), size=(5, 6), mode="nearest").long().reshape(-1)
    head_before = copy.deepcopy(head)
    head_before.prototypes.copy_(before)
    expected_protos, expected_target = ref.prototype_learning(head_before, emb.detach(), seg.detach(), gt)
    assert torch.equal(out.proto_target, expected_target)
    # untouched rows keep their stored bits (unit to float32 precision here); compare directions
    torch.testing.assert_close(F.normalize(head.prototypes, dim=-1), expected_protos, rtol=1e-12, atol=1e-12)
    assert not torch.equal(head.prototypes, before)  # something did move


def test_update_only_in_training_mode_and_flag():
    head, feat, target = make()
    before = head.prototypes.clone()
    head.eval()
    head(feat, target)
    assert torch.equal(head.prototypes, before)
    head.train()
    head.update_prototypes = False
    head(feat, target)
    assert torch.equal(head.prototypes, before)


def test_prototypes_are_a_unit_buffer_not_a_parameter():
    head, feat, target = make()
    names = [n for n, _ in head.named_parameters()]
    assert "prototypes" not in names and "prototypes" in dict(head.named_buffers())
    torch.testing.assert_close(head.prototypes.norm(dim=-1), torch.ones(N_CLS, K))
    out = head(feat, target)
    PrototypeLoss()(out, target)["loss"].backward()  # in-place update after forward must not break backward
    torch.testing.assert_close(head.prototypes.norm(dim=-1), torch.ones(N_CLS, K))
    assert set(head.state_dict()) == {
        "prototypes", "proj_head.proj.0.weight", "proj_head.proj.0.bias", "proj_head.proj.2.weight",
        "proj_head.proj.2.bias", "feat_norm.weight", "feat_norm.bias", "mask_norm.weight", "mask_norm.bias",
        "_extra_state",  # the class and options (tests/test_saved_options.py)
    }  # fmt: skip


def test_gumbel_update_reproducible_with_generator():
    results = []
    for seed in (1, 1, 2):
        head, feat, target = make(update_assignment="gumbel", gamma=0.5)
        head.generator = torch.Generator().manual_seed(seed)
        head(feat, target)
        results.append(head.prototypes.clone())
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def test_a_generator_made_for_cuda_draws_on_cuda_0():
    """torch.Generator(device="cuda") reports the device without an index (issue 41, item 6): it is accepted on
    cuda:0 (and any cuda:k, the current device at its creation), refused on another device type."""
    from adaptive_heads.protoseg import _same_device

    cuda, cuda0, cuda1, cpu = (torch.device(d) for d in ("cuda", "cuda:0", "cuda:1", "cpu"))
    assert _same_device(cuda, cuda0) and _same_device(cuda, cuda1) and _same_device(cuda0, cuda0)
    assert not _same_device(cuda0, cuda1) and not _same_device(cpu, cuda0) and not _same_device(cuda, cpu)
    assert _same_device(cpu, cpu)


def test_usage_counts_and_diversity():
    head, feat, target = make()
    out = head(feat, target)
    valid = out.proto_target >= 0
    assert head.usage_counts.sum() == valid.sum()
    expected = torch.bincount(out.proto_target[valid], minlength=N_CLS * K).view(N_CLS, K).float()
    assert torch.equal(head.usage_counts, expected)
    head.reset_usage()
    assert head.usage_counts.sum() == 0
    div = head.prototype_diversity()
    p = F.normalize(head.prototypes, dim=-1)
    c0 = (p[0] @ p[0].t()).sum() - K
    torch.testing.assert_close(div[0], c0 / (K * (K - 1)))
    with torch.no_grad():
        head.prototypes[1] = head.prototypes[1, :1]  # collapse class 1
    torch.testing.assert_close(head.prototype_diversity()[1], torch.tensor(1.0))


# ----------------------------------------------------------------------------- losses
def test_losses_match_formulas():
    head, feat, target = make(dtype=torch.float64)
    out = head(feat, target)
    terms = PrototypeLoss()(out, target)
    up = F.interpolate(out.logits, size=target.shape[-2:], mode="bilinear", align_corners=True)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(up, target, ignore_index=255))
    torch.testing.assert_close(terms["ppc"], F.cross_entropy(out.proto_logits, out.proto_target, ignore_index=-1))
    valid = out.proto_target >= 0
    picked = out.proto_logits[valid].gather(1, out.proto_target[valid][:, None])[:, 0]
    torch.testing.assert_close(terms["ppd"], ((1 - picked) ** 2).mean())
    torch.testing.assert_close(terms["loss"], terms["ce"] + 0.01 * terms["ppc"] + 0.001 * terms["ppd"])
    # T = 1 uses the head's similarity statistics: same gradient as autograd through the dense cosines
    dense = F.cross_entropy(out.proto_logits, out.proto_target, ignore_index=-1) + ((1 - picked) ** 2).mean()
    g_dense = torch.autograd.grad(dense, out.embeddings, retain_graph=True)[0]
    g_fused = torch.autograd.grad(terms["ppc"] + terms["ppd"], out.embeddings, retain_graph=True)[0]
    torch.testing.assert_close(g_fused, g_dense)
    t = PrototypeLoss(ppc_temperature=0.1)(out, target)
    torch.testing.assert_close(t["ppc"], F.cross_entropy(out.proto_logits / 0.1, out.proto_target, ignore_index=-1))
    w = torch.rand(N_CLS, dtype=torch.float64)
    tw = PrototypeLoss(class_weight=w)(out, target)
    torch.testing.assert_close(tw["ce"], F.cross_entropy(up, target, weight=w, ignore_index=255))


def test_gradients_reach_projection_and_norms_not_prototypes():
    head, feat, target = make()
    feat.requires_grad_(True)
    PrototypeLoss()(head(feat, target), target)["loss"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert feat.grad.abs().sum() > 0


def test_gradcheck_float64():
    head, feat, target = make(dtype=torch.float64, update_prototypes=False)
    feat = feat[:1, :, :2, :3].clone().requires_grad_(True)
    target = target[:1, :4, :6]
    loss_fn = PrototypeLoss(weights={"ppc": 1.0, "ppd": 1.0})
    assert torch.autograd.gradcheck(lambda f: loss_fn(head(f, target), target)["loss"], (feat,))


def test_all_ignored_finite_zero():
    head, feat, _ = make()
    target = torch.full((2, 20, 24), 255)
    before = head.prototypes.clone()
    feat.requires_grad_(True)
    terms = PrototypeLoss()(head(feat, target), target)
    assert all(v.item() == 0.0 for v in terms.values())
    terms["loss"].backward()
    assert torch.isfinite(feat.grad).all() and torch.equal(head.prototypes, before)


def test_bf16_autocast_finite():
    head, feat, target = make(update_assignment="gumbel")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(feat, target)
        terms = PrototypeLoss()(out, target)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert head.prototypes.dtype == torch.float32 and torch.isfinite(head.prototypes).all()


def test_to_dtype_moves_buffer_and_round_trips():
    head, feat, _target = make()
    h64 = copy.deepcopy(head).double()
    assert h64.prototypes.dtype == torch.float64
    clone = pickle.loads(pickle.dumps(head))
    head.eval(), clone.eval()
    torch.testing.assert_close(clone(feat), head(feat))
    other = PrototypeClassifier(C, N_CLS, num_prototypes=K)
    other.load_state_dict(head.state_dict())
    other.eval()
    torch.testing.assert_close(other(feat), head(feat))


def test_load_official_state_dict():
    head, feat, _ = make()
    sd = {}
    for k, v in head.state_dict().items():
        sd[f"module.{k}"] = v.clone()
        if k.startswith("proj_head.proj."):
            sd[f"module.{k.replace('proj.', 'mlp2.')}"] = v.clone()
    sd["module.prototypes"] = sd["module.prototypes"] * 3  # official prototypes are not stored normalised
    sd["module.backbone.conv1.weight"] = torch.zeros(1)
    sd["module.cls_head.0.weight"] = torch.zeros(1)
    fresh = PrototypeClassifier(C, N_CLS, num_prototypes=K)
    res = fresh.load_official_state_dict(sd)
    assert res.missing_keys == [] and res.unexpected_keys == []
    torch.testing.assert_close(fresh.prototypes, head.prototypes)
    fresh.eval(), head.eval()
    torch.testing.assert_close(fresh(feat), head(feat))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"update_assignment": "softmax"}, "update_assignment"),
        ({"projection_norm": "height"}, "projection_norm"),
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"gamma": 1.5}, "gamma"),
        ({"sinkhorn_eps": 0.0}, "sinkhorn_eps"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrototypeClassifier(C, N_CLS, **kwargs)


def test_bad_input_errors():
    head, feat, target = make()
    with pytest.raises(ValueError, match="in_channels=6"):
        head(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        head(feat, torch.full((2, 8, 8), 4))
    with pytest.raises(TypeError, match="PrototypeOutput"):
        PrototypeLoss()(object.__new__(PrototypeOutput.__mro__[1]) if False else _cac_like(), target)
    with pytest.raises(ValueError, match="class_weight"):
        PrototypeLoss(class_weight=torch.ones(3))(head(feat, target), target)


def _cac_like():
    from adaptive_heads import CACOutput

    z = torch.zeros(2, N_CLS, 5, 6)
    return CACOutput(logits=z, coarse=z, teacher=z, feature_target=torch.zeros(2, 5, 6, dtype=torch.long))


def test_checkpoint_embedding_gives_the_same_step():
    grads = []
    for checkpointed in (False, True):
        head, feat, target = make(dtype=torch.float64, checkpoint_embedding=checkpointed)
        feat.requires_grad_(True)
        terms = PrototypeLoss()(head(feat, target), target)
        terms["loss"].backward()
        grads.append([terms["loss"].detach(), feat.grad, head.prototypes.clone()])
        grads[-1] += [p.grad for p in head.parameters()]
    for a, b in zip(*grads, strict=False):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- prototypes from data
def test_init_prototypes_is_classwise_kmeans_of_the_embeddings():
    from adaptive_heads.functional import classwise_kmeans, resize_labels_nearest

    head, feat, target = make()
    before = head.prototypes.clone()
    counts = head.init_prototypes(feat, target, iters=4, generator=torch.Generator().manual_seed(0))
    labels = resize_labels_nearest(target, feat.shape[-2:]).reshape(-1)
    labels = torch.where(labels == 255, -1, labels)
    emb = head.embed(feat).reshape(-1, C)
    expected, expected_counts = classwise_kmeans(
        emb, labels, N_CLS, K, iters=4, init=F.normalize(before, dim=-1), generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(counts, expected_counts) and counts[2] == 0
    torch.testing.assert_close(head.prototypes, expected)
    assert torch.equal(head.prototypes[2], before[2])  # the class without pixels keeps its prototypes
    assert not torch.allclose(head.prototypes[0], before[0])
    # each fitted prototype is the normalised mean direction of the pixels nearest to it
    own = emb[labels == 0]
    nearest = (own @ head.prototypes[0].T).argmax(1)
    for k in nearest.unique().tolist():
        torch.testing.assert_close(head.prototypes[0, k], F.normalize(own[nearest == k].sum(0), dim=0))


def test_init_prototypes_checks_its_inputs():
    head, feat, target = make()
    with pytest.raises(ValueError, match="target has batch size 1"):
        head.init_prototypes(feat, target[:1])
    with pytest.raises(ValueError, match="feat"):
        head.init_prototypes(feat[:, :3], target)


def test_init_prototypes_on_an_all_ignored_batch_keeps_every_prototype():
    head, feat, target = make()
    before = head.prototypes.clone()
    counts = head.init_prototypes(feat, torch.full_like(target, 255))
    assert counts.tolist() == [0] * N_CLS
    assert torch.equal(head.prototypes, before) and torch.isfinite(head.prototypes).all()
