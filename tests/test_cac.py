"""ContextAwareClassifier and ContextAwareLoss against the loop reference of the official code."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import CACOutput, ContextAwareClassifier, ContextAwareLoss
from adaptive_heads.functional import context_aware_distillation

from . import reference_cac as ref

N, C = 5, 8


def make(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    head = ContextAwareClassifier(C, N, dropout=kw.pop("dropout", 0.0), **kw).to(dtype)
    feat = torch.randn(3, C, 6, 7, dtype=dtype).relu()
    target = torch.randint(0, N, (3, 24, 28))
    target[0, :5] = 255
    target[target == 3] = 1  # class 3 absent from the batch
    return head, feat, target


def test_eval_returns_bounded_logits_tensor():
    head, feat, _ = make()
    head.eval()
    out = head(feat)
    assert isinstance(out, torch.Tensor) and out.shape == (3, N, 6, 7) and out.dtype == torch.float32
    assert out.abs().max() <= 15.0 + 1e-4


def test_training_output_fields_and_shapes():
    head, feat, target = make(dropout=0.1)
    out = head(feat, target)
    assert isinstance(out, CACOutput)
    for t in (out.logits, out.coarse, out.teacher):
        assert t.shape == (3, N, 6, 7)
    assert out.feature_target.shape == (3, 6, 7)


def test_estimated_and_oracle_match_reference_loops():
    head, feat, target = make(dtype=torch.float64)
    out = head(feat, target)
    torch.testing.assert_close(out.coarse, head.conv_seg(feat))
    torch.testing.assert_close(out.logits, ref.estimated_logits(head, feat, out.coarse))
    torch.testing.assert_close(out.teacher, ref.oracle_logits(head, feat, target))
    head.eval()
    torch.testing.assert_close(head(feat), out.logits)


def test_teacher_absent_class_uses_classifier_row():
    head, feat, target = make(dtype=torch.float64)
    small = ref.nearest_labels(target, (6, 7))
    proto = head.teacher_classifier(feat, small)
    w = head.classifier_weight
    expected_absent = head.apd_proj(torch.cat([w[3], w[3]])[None])[0]
    torch.testing.assert_close(proto[3], expected_absent)


def test_teacher_per_image_option():
    head, feat, target = make(dtype=torch.float64, teacher_pooling="image")
    out = head(feat, target)
    # per image == batch pooling on each image alone
    for b in range(3):
        single = ref.oracle_logits(head, feat[b : b + 1], target[b : b + 1])
        torch.testing.assert_close(out.teacher[b : b + 1], single)


def test_losses_match_reference():
    head, feat, target = make(dtype=torch.float64)
    out = head(feat, target)
    terms = ContextAwareLoss()(out, target)
    size = target.shape[-2:]
    up = lambda z, ac: F.interpolate(z, size=size, mode="bilinear", align_corners=ac)  # noqa: E731
    torch.testing.assert_close(terms["ce_coarse"], F.cross_entropy(up(out.coarse, True), target, ignore_index=255))
    torch.testing.assert_close(terms["ce"], F.cross_entropy(up(out.logits, False), target, ignore_index=255))
    torch.testing.assert_close(terms["ce_teacher"], F.cross_entropy(up(out.teacher, True), target, ignore_index=255))
    distill = ref.distill_loss(out.logits, out.teacher, target)
    torch.testing.assert_close(terms["distill"], distill, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(terms["loss"], terms["ce_coarse"] + terms["ce"] + terms["ce_teacher"] + terms["distill"])
    # official mmseg-0.x main term: mean over all pixels
    official = ContextAwareLoss(main_average="all")(out, target)
    all_mean = F.cross_entropy(up(out.logits, False), target, ignore_index=255, reduction="sum") / target.numel()
    torch.testing.assert_close(official["ce"], all_mean)


def test_distill_is_soft_ce_not_kl_and_kl_option():
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    t = torch.randint(0, 4, (2, 3, 3))
    mixed = context_aware_distillation(logits, logits, t, 4)
    kl = context_aware_distillation(logits, logits, t, 4, mode="kl")
    assert mixed > 0.1  # the official term does not vanish when student == teacher
    assert abs(kl.item()) < 1e-12


def test_distill_class_average_all_divides_by_n():
    logits, teacher = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    t = torch.randint(0, 2, (2, 3, 3))  # two classes present of four
    present = context_aware_distillation(logits, teacher, t, 4)
    all_n = context_aware_distillation(logits, teacher, t, 4, class_average="all")
    torch.testing.assert_close(all_n, present * 2 / 4)


def _grads(head, feat, loss):
    head.zero_grad(set_to_none=True)
    f = feat.clone().requires_grad_(True)
    loss(f).backward()
    flag = lambda p: p is not None and p.abs().sum() > 0  # noqa: E731
    return {
        "feat": flag(f.grad),
        "w": flag(head.conv_seg.weight.grad),
        "b": flag(head.conv_seg.bias.grad),
        "proj": any(flag(p.grad) for p in head.proj.parameters()),
        "apd_proj": any(flag(p.grad) for p in head.apd_proj.parameters()),
    }


@pytest.mark.parametrize(
    "term,expected",
    [
        ("ce_coarse", dict(feat=True, w=True, b=True, proj=False, apd_proj=False)),
        ("ce", dict(feat=True, w=True, b=True, proj=True, apd_proj=False)),
        ("distill", dict(feat=True, w=True, b=True, proj=True, apd_proj=False)),
        ("ce_teacher", dict(feat=True, w=True, b=False, proj=False, apd_proj=True)),
    ],
)
def test_gradient_flow_matches_detach_table(term, expected):
    head, feat, target = make()
    loss_fn = ContextAwareLoss()
    got = _grads(head, feat, lambda f: loss_fn(head(f, target), target)[term])
    assert got == expected


def test_teacher_first_concat_half_is_detached():
    head, feat, target = make()
    with torch.no_grad():
        head.apd_proj[0].weight[:, C:] = 0  # cut the W half of the oracle projector input
    loss_fn = ContextAwareLoss()
    got = _grads(head, feat, lambda f: loss_fn(head(f, target), target)["ce_teacher"])
    assert not got["w"]  # the pooled/fallback half carries no gradient into conv_seg


def test_gradcheck_float64():
    torch.manual_seed(0)
    head = ContextAwareClassifier(3, 2, dropout=0.0).double()
    feat = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 1, 1], [255, 0, 1]], [[1, 1, 1], [0, 0, 255]]])
    # the distillation detaches its teacher, so finite differences through the features disagree with
    # autograd by design: check it with respect to the student logits, the rest through the features
    loss_fn = ContextAwareLoss(weights={"distill": 0.0})
    assert torch.autograd.gradcheck(lambda f: loss_fn(head(f, target), target)["loss"], (feat,))
    student = torch.randn(2, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 2, 2, 3, dtype=torch.float64)
    small = target[:, :, :3]
    for mode in ("mixed", "kl"):
        assert torch.autograd.gradcheck(
            lambda s, mode=mode: context_aware_distillation(s, teacher, small, 2, mode=mode), (student,)
        )
    head.eval()
    assert torch.autograd.gradcheck(lambda f: head(f), (feat,))


def test_all_ignored_batch_is_finite_zero_extra_terms():
    head, feat, _ = make()
    target = torch.full((3, 24, 28), 255)
    feat.requires_grad_(True)
    terms = ContextAwareLoss()(head(feat, target), target)
    for v in terms.values():
        assert torch.isfinite(v)
        assert v.item() == 0.0
    terms["loss"].backward()
    assert torch.isfinite(feat.grad).all()


def test_single_class_batch_finite():
    head, feat, _ = make()
    target = torch.full((3, 24, 28), 2)
    terms = ContextAwareLoss()(head(feat, target), target)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()


def test_zero_features_no_nan():
    head, _, target = make()
    feat = torch.zeros(3, C, 6, 7)
    terms = ContextAwareLoss()(head(feat, target), target)
    assert all(torch.isfinite(v) for v in terms.values())


def test_two_classes_and_c1_work():
    head = ContextAwareClassifier(1, 2, dropout=0.0)
    feat = torch.rand(2, 1, 3, 3)
    target = torch.zeros(2, 6, 6, dtype=torch.long)
    terms = ContextAwareLoss()(head(feat, target), target)
    assert all(torch.isfinite(v) for v in terms.values())


def test_state_dict_round_trip_and_keys():
    head, feat, _ = make()
    keys = set(head.state_dict())
    assert keys == {
        "conv_seg.weight",
        "conv_seg.bias",
        "proj.0.weight",
        "proj.2.weight",
        "proj.2.bias",
        "apd_proj.0.weight",
        "apd_proj.2.weight",
        "apd_proj.2.bias",
        "_extra_state",  # the class and options (tests/test_saved_options.py)
    }
    other = ContextAwareClassifier(C, N, dropout=0.0)
    other.load_state_dict(head.state_dict())
    head.eval(), other.eval()
    torch.testing.assert_close(head(feat), other(feat))
    clone = pickle.loads(pickle.dumps(head))
    torch.testing.assert_close(clone(feat), head(feat))
    torch.testing.assert_close(copy.deepcopy(head)(feat), head(feat))


def test_parameter_count_matches_paper_table():
    head = ContextAwareClassifier(512, 150)
    extra = sum(p.numel() for n, p in head.named_parameters() if not n.startswith("conv_seg"))
    assert extra == 787_456


def test_load_official_state_dict():
    head, _feat, _ = make()
    sd = {f"decode_head.{k}": v.clone() + 1 for k, v in head.state_dict().items()}
    sd["backbone.conv1.weight"] = torch.zeros(1)
    sd["decode_head.fpn_bottleneck.conv.weight"] = torch.zeros(1)
    fresh = ContextAwareClassifier(C, N)
    result = fresh.load_official_state_dict({"state_dict": sd, "meta": {}})
    assert result.missing_keys == [] and result.unexpected_keys == ["fpn_bottleneck.conv.weight"]
    torch.testing.assert_close(fresh.proj[0].weight, head.proj[0].weight + 1)
    # OCRNet cascade prefix and DDP prefix
    ocr = {f"module.decode_head.1.{k}": v for k, v in head.state_dict().items()}
    fresh2 = ContextAwareClassifier(C, N)
    assert fresh2.load_official_state_dict(ocr).missing_keys == []
    torch.testing.assert_close(fresh2.conv_seg.weight, head.conv_seg.weight)
    partial = {"decode_head.conv_seg.weight": head.conv_seg.weight}
    assert "proj.0.weight" in ContextAwareClassifier(C, N).load_official_state_dict(partial).missing_keys
    with pytest.raises(KeyError, match="missing"):
        ContextAwareClassifier(C, N).load_official_state_dict(partial, strict=True)
    with pytest.raises(KeyError, match="prefix"):
        ContextAwareClassifier(C, N).load_official_state_dict({"backbone.x": torch.zeros(1)})


def test_strip_training_layers_keeps_inference():
    head, feat, _ = make()
    head.eval()
    before = head(feat)
    head.strip_training_layers()
    assert not any(k.startswith("apd_proj") for k in head.state_dict())
    assert torch.equal(head(feat), before)


@pytest.mark.parametrize(
    "feat,target,exc,match",
    [
        (torch.randn(2, C, 4), None, ValueError, "shape \\[B, C, h, w\\]"),
        (torch.randn(2, C + 1, 4, 4), None, ValueError, "in_channels=8"),
        (torch.randint(0, 3, (2, C, 4, 4)), None, TypeError, "floating-point"),
        (torch.randn(2, C, 4, 4), torch.full((2, 8, 8), 7), ValueError, "outside \\[0, 5\\)"),
        (torch.randn(2, C, 4, 4), torch.full((2, 8, 8), -1), ValueError, "not ignore_index=255"),
        (torch.randn(2, C, 4, 4), torch.zeros(3, 8, 8, dtype=torch.long), ValueError, "batch size 3"),
        (torch.randn(2, C, 4, 4), torch.zeros(2, 8, 8), TypeError, "integer tensor"),
        (torch.randn(2, C, 4, 4), torch.zeros(2, 2, 8, 8, dtype=torch.long), ValueError, "\\[B, H, W\\]"),
    ],
)
def test_bad_input_errors(feat, target, exc, match):
    head = ContextAwareClassifier(C, N)
    with pytest.raises(exc, match=match):
        head(feat, target) if target is not None else head(feat)


def test_constructor_and_loss_argument_errors():
    with pytest.raises(ValueError, match="teacher_pooling"):
        ContextAwareClassifier(C, N, teacher_pooling="pixel")
    with pytest.raises(ValueError, match="in_channels"):
        ContextAwareClassifier(0, N)
    with pytest.raises(ValueError, match="unknown loss terms"):
        ContextAwareLoss(weights={"kl": 1.0})
    with pytest.raises(ValueError, match="reduction"):
        ContextAwareLoss(reduction="none")
    head, feat, target = make()
    with pytest.raises(TypeError, match="structured output"):
        ContextAwareLoss()(head(feat), target)


def test_labels_at_feature_resolution_and_batch_one():
    head, feat, _ = make()
    target = torch.randint(0, N, (1, 6, 7))
    terms = ContextAwareLoss()(head(feat[:1], target), target)
    assert all(torch.isfinite(v) for v in terms.values())


def test_weights_and_sum_reduction():
    head, feat, target = make(dtype=torch.float64)
    out = head(feat, target)
    base = ContextAwareLoss()(out, target)
    weighted = ContextAwareLoss(weights={"distill": 2.0, "ce_coarse": 0.0})(out, target)
    torch.testing.assert_close(weighted["loss"], base["ce"] + base["ce_teacher"] + 2 * base["distill"])
    summed = ContextAwareLoss(reduction="sum")(out, target)
    valid = (target != 255).sum()
    torch.testing.assert_close(summed["ce_coarse"], base["ce_coarse"] * valid)
