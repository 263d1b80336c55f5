"""Cross-entropy and sigmoid statistics at label resolution, tiled, against F.interpolate + the plain losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import functional as AF


@pytest.mark.parametrize("align", [False, True])
def test_upsampled_cross_entropy_matches_torch(align):
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 20, 24))
    target[0, :3] = 255
    up = F.interpolate(logits, size=(20, 24), mode="bilinear", align_corners=align)
    expected = F.cross_entropy(up, target, ignore_index=255)
    out = AF.upsampled_cross_entropy(logits, target, ignore_index=255, align_corners=align)
    torch.testing.assert_close(out, expected)
    out_all = AF.upsampled_cross_entropy(logits, target, ignore_index=255, align_corners=align, average="all")
    torch.testing.assert_close(out_all, F.cross_entropy(up, target, ignore_index=255, reduction="sum") / target.numel())
    w = torch.rand(4)
    torch.testing.assert_close(
        AF.upsampled_cross_entropy(logits, target, ignore_index=255, align_corners=align, class_weight=w),
        F.cross_entropy(up, target, weight=w, ignore_index=255),
    )


def test_upsampled_cross_entropy_all_ignored_is_zero():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    out = AF.upsampled_cross_entropy(logits, torch.full((1, 8, 8), 255), ignore_index=255)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("src,dst", [((5, 6), (20, 24)), ((7, 3), (29, 10)), ((8, 8), (8, 8)), ((9, 11), (4, 5))])
@pytest.mark.parametrize("tile", [None, 64])
def test_tiled_upsampled_ce_equals_plain_value_and_gradient(align, src, dst, tile):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, *src, requires_grad=True)
    target = torch.randint(0, 5, (2, *dst))
    target[1, : dst[0] // 2] = 255
    weight = torch.rand(5)
    for w in (None, weight):
        up = F.interpolate(logits, size=dst, mode="bilinear", align_corners=align)
        plain = F.cross_entropy(up, target, weight=w, ignore_index=255)
        (g_plain,) = torch.autograd.grad(plain, logits)
        fused = AF.upsampled_cross_entropy(logits, target, align_corners=align, class_weight=w, tile_elements=tile)
        (g_fused,) = torch.autograd.grad(fused, logits)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-6)


def test_tiled_upsampled_ce_gradcheck_and_bad_arguments():
    logits = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (1, 5, 7))
    assert torch.autograd.gradcheck(lambda z: AF.upsampled_cross_entropy(z, target, tile_elements=8), (logits,))
    with pytest.raises(ValueError, match="reduction"):
        AF.upsampled_cross_entropy(logits, target, reduction="none")
    with pytest.raises(ValueError, match="average"):
        AF.upsampled_cross_entropy(logits, target, average="some")


def test_tiled_upsampled_ce_gradient_scales_and_no_grad_value():
    """The gradient is computed in the forward pass: it must still follow the incoming gradient, and a
    no-grad call (evaluation) must give the same value without it."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    target = torch.randint(0, 4, (2, 17, 23))
    loss = AF.upsampled_cross_entropy(logits, target, tile_elements=100)
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g_scaled,) = torch.autograd.grad(-2.5 * loss, logits)
    torch.testing.assert_close(g_scaled, -2.5 * g1)
    with torch.no_grad():
        torch.testing.assert_close(AF.upsampled_cross_entropy(logits, target, tile_elements=100), loss.detach())
    frozen = AF.upsampled_cross_entropy(logits.detach(), target, tile_elements=100)
    assert not frozen.requires_grad and torch.equal(frozen, loss.detach())


def test_tiled_sigmoid_stats_gradcheck():

    logits = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 7, 5))
    valid = torch.rand(2, 7, 5) > 0.3
    assert torch.autograd.gradcheck(
        lambda z: AF.upsampled_sigmoid_stats(z, target, valid, align_corners=False, tile_elements=20), (logits,)
    )


def test_bilinear_source_rows_match_interpolate():
    for align in (False, True):
        for out_size, in_size in ((17, 5), (4, 9), (1, 3), (6, 1)):
            x = torch.randn(1, 1, in_size, 1)
            i0, i1, w1 = AF.bilinear_source_rows(out_size, in_size, align, x.device)
            manual = x[0, 0, i0, 0] * (1 - w1) + x[0, 0, i1, 0] * w1
            ref = F.interpolate(x, size=(out_size, 1), mode="bilinear", align_corners=align)[0, 0, :, 0]
            torch.testing.assert_close(manual, ref)


@pytest.mark.parametrize("src,dst,tile", [((5, 6), (20, 24), None), ((7, 3), (29, 10), 50), ((4, 4), (4, 4), None)])
def test_tiled_sigmoid_stats_equal_plain(src, dst, tile):

    torch.manual_seed(0)
    logits = torch.randn(2, 4, *src, requires_grad=True)
    target = torch.randint(0, 4, (2, *dst))
    valid = torch.rand(2, *dst) > 0.3
    prob = torch.sigmoid(F.interpolate(logits, size=dst, mode="bilinear", align_corners=True))
    mask = F.one_hot(target, 4).permute(0, 3, 1, 2) * valid[:, None]
    plain = (prob.sum((2, 3)), (prob * mask).sum((2, 3)))
    fused = AF.upsampled_sigmoid_stats(logits, target, valid, align_corners=True, tile_elements=tile)
    gt, go = torch.randn(2, 4), torch.randn(2, 4)
    g_plain = torch.autograd.grad((plain[0] * gt).sum() + (plain[1] * go).sum(), logits)[0]
    g_fused = torch.autograd.grad((fused[0] * gt).sum() + (fused[1] * go).sum(), logits)[0]
    for a, b in zip(fused, plain, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("align", [False, True])
def test_deterministic_width_adjoint_equals_the_kernel(align, monkeypatch):
    """In deterministic mode (whose CUDA upsample-backward kernel uses atomics) the width adjoint is banded matrix
    products over column blocks: the same gradients."""
    import adaptive_heads.functional.upsampled as upsampled

    monkeypatch.setattr(upsampled, "COLUMN_BLOCK", 7)  # several blocks on a small map
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9, 11, requires_grad=True)
    target = torch.randint(0, 5, (2, 37, 45))
    target[0, :5] = 255
    grads = []
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            logits.grad = None
            ce = AF.upsampled_cross_entropy(logits, target, align_corners=align, tile_elements=500)
            total, own = AF.upsampled_sigmoid_stats(logits, target.clamp(0, 4), target != 255, align_corners=align)
            (ce + total.sum() * 1e-3 + own.sum() * 1e-3).backward()
            grads.append(logits.grad.clone())
        finally:
            torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.fixture(params=["whole", "tiled"])
def one_pass_or_tiles(request):
    """The label-resolution terms as one pass (a large budget) or in row tiles (a budget of a few rows)."""
    from adaptive_heads import set_memory_budget

    set_memory_budget(2**30 if request.param == "whole" else 4096, "cpu")
    yield request.param
    set_memory_budget(None, "cpu")


def test_stacked_cross_entropy_sums_equal_each_alone(one_pass_or_tiles):
    """T logits share one upsampling: each sum and its gradient equal those of the logits alone."""
    torch.manual_seed(0)
    logits = [torch.randn(2, 4, 5, 6, requires_grad=True) for _ in range(3)]
    target = torch.randint(0, 4, (2, 19, 23))
    target[0, :4] = 255
    sums, count = AF.upsampled_cross_entropy_sums(logits, target, align_corners=True)
    weights = torch.tensor([1.0, -2.0, 0.5])
    together = torch.autograd.grad((sums * weights).sum(), logits)
    for t, z in enumerate(logits):
        alone, alone_count = AF.upsampled_cross_entropy_sums([z], target, align_corners=True)
        plain = F.cross_entropy(
            F.interpolate(z, size=(19, 23), mode="bilinear", align_corners=True),
            target,
            reduction="sum",
            ignore_index=255,
        )
        torch.testing.assert_close(sums[t], alone[0])
        torch.testing.assert_close(sums[t], plain, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(together[t], weights[t] * torch.autograd.grad(plain, z)[0], rtol=1e-5, atol=1e-6)
        assert count == alone_count == (target != 255).sum()


def test_stacked_sigmoid_dice_equals_the_loop_value_and_gradient(one_pass_or_tiles):
    """The dice reduced inside the pass (its gradient weighted before the adjoint, or per tile) against the loop
    reference of the official per-(image, class) dice, for a student and a teacher together."""
    from ..reference_ssa import dice

    torch.manual_seed(0)
    student, teacher = (torch.randn(2, 4, 5, 6, requires_grad=True) for _ in range(2))
    target = torch.randint(0, 3, (2, 19, 23))  # class 3 absent: not averaged
    target[1, :5] = 255
    both = AF.sigmoid_dice_losses([student, teacher], target)
    got = torch.autograd.grad(both[0] - 3 * both[1], (student, teacher))
    want_s, want_t = dice(student, target), dice(teacher, target)
    torch.testing.assert_close(both, torch.stack([want_s, want_t]))
    expected = torch.autograd.grad(want_s - 3 * want_t, (student, teacher))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sigmoid_dice_gradcheck_both_passes():
    logits = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 7, 5))
    target[0, 0] = 255
    from adaptive_heads.functional.dice import _mean_dice

    safe, valid = AF.valid_labels(target, 3, 255)
    area = AF.class_pixel_counts(safe, 3, valid)
    for tile in (None, 20):  # tile_elements=None: the whole pass on a map this small
        assert torch.autograd.gradcheck(
            lambda z, tile=tile: AF.upsampled_sigmoid_loss(
                [z, 2 * z], safe, valid, _mean_dice, area, tile_elements=tile
            ).sum(),
            (logits,),
        )
