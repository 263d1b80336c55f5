"""SSAClassifier and SSALoss against the loop reference of the official code."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import SSAClassifier, SSALoss, SSAOutput
from adaptive_heads.functional import (
    boundary_distillation,
    label_boundary,
    position_distillation,
    relation_distillation,
    sigmoid_dice_loss,
)

from . import reference_ssa as ref

N, C = 5, 8


def make(dtype=torch.float32, seed=0, size=(14, 15), **kw):
    torch.manual_seed(seed)
    head = SSAClassifier(C, N, dropout=kw.pop("dropout", 0.0), **kw).to(dtype)
    feat = torch.randn(3, C, *size, dtype=dtype).relu()
    target = torch.randint(0, N, (3, size[0] * 4, size[1] * 4))
    target[:, : size[0] * 2, : size[1] * 2] = 0  # a large region so boundaries and interiors both exist
    target[0, -6:] = 255
    target[target == 3] = 1  # class 3 absent
    return head, feat, target


def test_shapes_and_bounded_eval():
    head, feat, target = make()
    out = head(feat, target)
    assert isinstance(out, SSAOutput)
    for t in (out.logits, out.coarse, out.teacher):
        assert t.shape == (3, N, 14, 15)
    for t in (out.semantic, out.semantic_teacher, out.position, out.position_teacher):
        assert t.shape == (3, N, C)
    head.eval()
    logits = head(feat)
    assert logits.shape == (3, N, 14, 15) and logits.abs().max() <= 15 + 1e-4
    with torch.no_grad():  # the in-place no-grad path gives the same numbers
        torch.testing.assert_close(head(feat), logits)


def test_forward_matches_reference_loops():
    head, feat, target = make(dtype=torch.float64)
    out = head(feat, target)
    expected = ref.forward(head, feat, target)
    for name in ("logits", "coarse", "teacher", "semantic", "semantic_teacher", "position", "position_teacher"):
        torch.testing.assert_close(getattr(out, name), expected[name], msg=name)
    assert torch.equal(out.feature_target, expected["feature_target"])


def test_teacher_pooling_per_image_option():
    head, feat, target = make(dtype=torch.float64, teacher_pooling="image")
    out = head(feat, target)
    for b in range(3):
        single = ref.forward(head, feat[b : b + 1], target[b : b + 1])
        torch.testing.assert_close(out.teacher[b : b + 1], single["teacher"])


# ----------------------------------------------------------------------------- boundary
def test_label_boundary_vertical_and_horizontal_steps():
    labels = torch.zeros(1, 20, 20, dtype=torch.long)
    labels[:, :, 10:] = 1  # step between columns 9 and 10
    band = label_boundary(labels)
    expected = torch.zeros(20, 20)
    expected[5:15, 8:11] = 1  # edge at column 9 on rows 6..13, dilated by 3x3
    assert torch.equal(band[0], expected)
    horizontal = label_boundary(labels.transpose(1, 2))
    assert torch.equal(horizontal[0], expected.t())


def test_label_boundary_border_ignore_and_tiny_maps():
    labels = torch.zeros(1, 20, 20, dtype=torch.long)
    labels[:, :3, :] = 1  # step next to the border only
    assert label_boundary(labels).sum() == 0
    labels = torch.zeros(1, 20, 20, dtype=torch.long)
    labels[:, 10:, :] = 255  # the ignore value is a label for the edge detector, as in the official uint8 image
    assert label_boundary(labels)[0, 9].sum() > 0
    assert label_boundary(labels, border=0, dilation=1)[0].sum() == 20
    for size in ((1, 1), (2, 3), (7, 11)):
        assert label_boundary(torch.randint(0, 3, (2, *size))).shape == (2, *size)


# ----------------------------------------------------------------------------- losses
def test_loss_terms_match_reference():
    head, feat, target = make(dtype=torch.float64)
    out = head(feat, target)
    terms = SSALoss()(out, target)
    up = lambda z: F.interpolate(z, size=target.shape[-2:], mode="bilinear", align_corners=True)  # noqa: E731
    torch.testing.assert_close(terms["ce"], F.cross_entropy(up(out.logits), target, ignore_index=255))
    torch.testing.assert_close(terms["ce_coarse"], F.cross_entropy(up(out.coarse), target, ignore_index=255))
    torch.testing.assert_close(terms["ce_teacher"], F.cross_entropy(up(out.teacher), target, ignore_index=255))
    beta = label_boundary(out.feature_target).double()
    assert 0 < beta.mean() < 1
    torch.testing.assert_close(terms["distill"], ref.distill(out.logits, out.teacher, out.feature_target, beta))
    torch.testing.assert_close(terms["dice"], ref.dice(out.logits, target))
    torch.testing.assert_close(terms["dice_teacher"], ref.dice(out.teacher, target))
    torch.testing.assert_close(terms["relation"], ref.relation(out.semantic, out.semantic_teacher))
    torch.testing.assert_close(terms["position"], ref.position(out.position, out.position_teacher))
    weights = {"ce": 1, "ce_coarse": 1, "ce_teacher": 1, "distill": 1, "dice": 1, "dice_teacher": 1}
    expected = sum(w * terms[k] for k, w in weights.items()) + 10 * terms["relation"] + 0.4 * terms["position"]
    torch.testing.assert_close(terms["loss"], expected)
    official = SSALoss(main_average="all")(out, target)
    all_mean = F.cross_entropy(up(out.logits), target, ignore_index=255, reduction="sum") / target.numel()
    torch.testing.assert_close(official["ce"], all_mean)


def test_loss_terms_are_float32_not_float64():
    head, feat, target = make()
    terms = SSALoss()(head(feat, target), target)
    assert all(v.dtype == torch.float32 for v in terms.values())


MODULES = ("F", "W", "b", "get_feat_pos", "E", "center_content_proj", "center_pos_proj", "center_proj", "gt")


def _flags(head, feat, loss):
    head.zero_grad(set_to_none=True)
    f = feat.clone().requires_grad_(True)
    loss(f).backward()

    def nz(params):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    return {
        "F": nz([f]),
        "W": nz([head.conv_seg.weight]),
        "b": nz([head.conv_seg.bias]),
        "get_feat_pos": nz(head.get_feat_pos.parameters()),
        "E": nz([head.center_pos.weight]),
        "center_content_proj": nz(head.center_content_proj.parameters()),
        "center_pos_proj": nz(head.center_pos_proj.parameters()),
        "center_proj": nz(head.center_proj.parameters()),
        "gt": nz(
            [
                *head.gt_center_content_proj.parameters(),
                *head.gt_center_pos_proj.parameters(),
                *head.gt_center_proj.parameters(),
            ]
        ),
    }


# ssa.md §5 gradient-flow table (Y = receives gradient)
FLOW = {
    "ce": "F W b get_feat_pos E center_content_proj center_pos_proj center_proj",
    "dice": "F W b get_feat_pos E center_content_proj center_pos_proj center_proj",
    "distill": "F W b get_feat_pos E center_content_proj center_pos_proj center_proj",
    "ce_coarse": "F W b",
    "ce_teacher": "F W get_feat_pos E gt",
    "dice_teacher": "F W get_feat_pos E gt",
    "relation": "F W b center_content_proj",
    "position": "F W b get_feat_pos E center_pos_proj",
}


@pytest.mark.parametrize("term", sorted(FLOW))
def test_gradient_flow_table(term):
    head, feat, target = make()
    loss_fn = SSALoss()
    got = _flags(head, feat, lambda f: loss_fn(head(f, target), target)[term])
    expected = {m: m in FLOW[term].split() for m in MODULES}
    assert got == expected


def test_gradcheck_float64_non_distilled_terms_and_distillations():
    torch.manual_seed(0)
    head = SSAClassifier(3, 2, dropout=0.0).double()
    feat = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 1, 1], [255, 0, 1]]])
    loss_fn = SSALoss(weights={"distill": 0.0, "relation": 0.0, "position": 0.0})
    assert torch.autograd.gradcheck(lambda f: loss_fn(head(f, target), target)["loss"], (feat,))
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: position_distillation(z, t), (s,))
    logits = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 2, 2, 3, dtype=torch.float64)
    beta = torch.tensor([[[1.0, 0, 0], [0, 1, 0]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: boundary_distillation(z, teacher, target, 2, boundary=beta), (logits,))
    assert torch.autograd.gradcheck(lambda z: sigmoid_dice_loss(z, target), (logits,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_distillations_match_the_loops_value_and_gradient(dtype):
    """relation/position_distillation compute their gradient in the forward pass: the loop references' autograd
    (the stop-gradient on the right factor of R(S) included) must agree, also for an all-zero prototype."""
    torch.manual_seed(0)
    student = torch.randn(2, 4, 6, dtype=dtype)
    student[1, 2] = 0  # an absent class: F.normalize's clamp, no gradient through the norm
    teacher = torch.randn(2, 4, 6, dtype=dtype)
    for fused, loop in ((relation_distillation, ref.relation), (position_distillation, ref.position)):
        a, b = student.clone().requires_grad_(), student.clone().requires_grad_()
        got, want = fused(a, teacher), loop(b, teacher)
        (3 * got).backward()
        (3 * want).backward()
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(a.grad, b.grad, **tol)
    shared = teacher[:1].expand_as(student)  # one [n, C] teacher for the batch
    torch.testing.assert_close(relation_distillation(student, teacher[0]), ref.relation(student, shared))
    assert not relation_distillation(student, teacher).requires_grad  # no graph without a student gradient


def test_relation_hinge_is_one_sided():
    teacher = torch.randn(1, 4, 6)
    assert relation_distillation(teacher.clone(), teacher) == 0  # equal relations: no penalty
    flat = torch.ones(1, 4, 6)  # all classes identical: maximal off-diagonal similarity
    assert relation_distillation(flat, teacher) > 0


def test_strip_training_layers_bit_identical():
    head, feat, _ = make()
    head.eval()
    before = head(feat)
    head.strip_training_layers()
    assert not any(k.startswith("gt_") for k in head.state_dict())
    assert torch.equal(head(feat), before)
    head.train()
    with pytest.raises(RuntimeError, match="strip_training_layers"):
        head(feat, torch.zeros(3, 14, 15, dtype=torch.long))


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 7), (11, 11)])
def test_tiny_feature_maps(size):
    head, feat, target = make(size=size)
    terms = SSALoss()(head(feat, target), target)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()


def test_all_ignored_batch_finite():
    head, feat, _ = make()
    target = torch.full((3, 56, 60), 255)
    feat.requires_grad_(True)
    terms = SSALoss()(head(feat, target), target)
    for k in ("ce", "ce_coarse", "ce_teacher", "distill", "dice", "dice_teacher"):
        assert terms[k].item() == 0.0, k
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert torch.isfinite(feat.grad).all()


def test_state_dict_keys_round_trip_and_official_load():
    head, feat, _ = make()
    keys = set(head.state_dict())
    assert {"conv_seg.weight", "get_feat_pos.weight", "center_pos.weight", "center_proj.weight",
            "gt_center_proj.weight", "center_content_proj.0.weight", "gt_center_pos_proj.2.bias"} <= keys  # fmt: skip
    sd = {f"decode_head.{k}": v.clone() for k, v in head.state_dict().items()}
    sd["decode_head.ssa_loss.criterion.empty_weight"] = torch.ones(N + 1)
    sd["backbone.stem.weight"] = torch.zeros(1)
    fresh = SSAClassifier(C, N)
    res = fresh.load_official_state_dict({"state_dict": sd})
    assert res.missing_keys == [] and res.unexpected_keys == []
    head.eval(), fresh.eval()
    torch.testing.assert_close(fresh(feat), head(feat))
    torch.testing.assert_close(pickle.loads(pickle.dumps(head))(feat), head(feat))
    torch.testing.assert_close(copy.deepcopy(head)(feat), head(feat))


def test_bad_input_and_argument_errors():
    head, feat, _target = make()
    with pytest.raises(ValueError, match="in_channels=8"):
        head(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="outside"):
        head(feat, torch.full((3, 8, 8), N))
    with pytest.raises(ValueError, match="teacher_pooling"):
        SSAClassifier(C, N, teacher_pooling="pixel")
    with pytest.raises(ValueError, match="unknown loss terms"):
        SSALoss(weights={"focal": 1.0})
