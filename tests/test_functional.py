"""The shared core: each function against a hand-written formula or loop."""

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import functional as AF


@pytest.mark.parametrize(
    "src,dst",
    [
        ((32, 32), (8, 8)),
        ((17, 23), (5, 7)),
        ((8, 8), (8, 8)),
        ((5, 9), (10, 3)),
        ((512, 512), (128, 128)),
        ((97, 61), (13, 29)),
        ((4, 4), (8, 8)),
    ],
)
def test_resize_labels_nearest_matches_legacy_interpolate(src, dst):
    y = torch.randint(0, 300, (2, *src))
    expected = F.interpolate(y[:, None].float(), size=dst, mode="nearest")[:, 0].long()
    assert torch.equal(AF.resize_labels_nearest(y, dst), expected)


def test_resize_labels_takes_top_left_of_each_block():
    y = torch.arange(16).view(1, 4, 4)
    assert AF.resize_labels_nearest(y, (2, 2)).tolist() == [[[0, 2], [8, 10]]]


def test_soft_class_pool_is_weighted_mean():
    probs = torch.rand(2, 3, 4, 5)
    feat = torch.randn(2, 6, 4, 5)
    out = AF.soft_class_pool(probs, feat)
    for b in range(2):
        for k in range(3):
            wts = probs[b, k].flatten()
            expected = (feat[b].flatten(1) * wts).sum(-1) / (wts.sum() + 1e-12)
            torch.testing.assert_close(out[b, k], expected)


def test_hard_class_pool_per_image_and_batch():
    feat = torch.randn(2, 4, 3, 3)
    labels = torch.tensor([[[0, 0, 1], [1, 255, 2], [2, 2, 2]], [[1, 1, 1], [1, 1, 1], [255, 255, 0]]])
    sums, counts = AF.hard_class_pool(feat, labels, 4, ignore_index=255, per_image=True)
    assert sums.shape == (2, 4, 4) and counts.shape == (2, 4)
    for b in range(2):
        for k in range(4):
            m = labels[b] == k
            assert counts[b, k] == m.sum()
            torch.testing.assert_close(sums[b, k], feat[b][:, m].sum(-1))
    bsums, bcounts = AF.hard_class_pool(feat, labels, 4, ignore_index=255, per_image=False)
    torch.testing.assert_close(bsums, sums.sum(0))
    assert bcounts.tolist() == [3.0, 8.0, 4.0, 0.0]


def test_label_one_hot_ignore_inside_class_range():
    labels = torch.tensor([[0, 1, 2, 1]])
    oh = AF.label_one_hot(labels, 3, ignore_index=1, dtype=torch.float32)
    assert oh[0].t().tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]]


@pytest.mark.parametrize("per_image", [False, True])
def test_cosine_logits_formula(per_image):
    feat = torch.randn(2, 5, 3, 4)
    weight = torch.randn(2, 6, 5) if per_image else torch.randn(6, 5)
    out = AF.cosine_logits(feat, weight, 15.0)
    x = feat / (feat.norm(dim=1, keepdim=True) + 1e-12)
    w = weight / (weight.norm(dim=-1, keepdim=True) + 1e-12)
    expected = torch.einsum("bnc,bchw->bnhw" if per_image else "nc,bchw->bnhw", w, x) * 15
    torch.testing.assert_close(out, expected)
    assert out.abs().max() <= 15 + 1e-5


def test_cosine_logits_zero_pixel_gives_zero_not_nan():
    feat = torch.zeros(1, 4, 2, 2)
    out = AF.cosine_logits(feat, torch.randn(3, 4), 15.0)
    assert torch.equal(out, torch.zeros_like(out))


def _loop_classwise(values, weights, labels, n, ignore):
    classes = [k for k in range(n) if (labels == k).any()]
    total = 0.0
    for k in classes:
        m = (labels == k).double()
        total += (m * weights * values).sum() / ((m * weights).sum() + 1e-12)
    return total / (len(classes) + 1e-12)


def test_classwise_weighted_mean_matches_loop():
    torch.manual_seed(0)
    values = torch.rand(3, 7, 5, dtype=torch.float64)
    weights = torch.rand(3, 7, 5, dtype=torch.float64)
    labels = torch.randint(0, 6, (3, 7, 5))
    labels[labels == 5] = 255
    labels[labels == 2] = 3  # class 2 absent
    out = AF.classwise_weighted_mean(values, weights, labels, 5, ignore_index=255)
    torch.testing.assert_close(out, torch.as_tensor(_loop_classwise(values, weights, labels, 5, 255)))
    all_avg = AF.classwise_weighted_mean(values, weights, labels, 5, ignore_index=255, average="all")
    present = [k for k in range(5) if (labels == k).any()]
    torch.testing.assert_close(all_avg, out * len(present) / 5)


def test_classwise_weighted_mean_empty_is_zero_with_grad():
    values = torch.rand(4, requires_grad=True)
    out = AF.classwise_weighted_mean(values, torch.ones(4), torch.full((4,), 255), 3, ignore_index=255)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(values.grad).all()


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


def test_prototype_mlp_structure():
    mlp = AF.prototype_mlp(8)
    assert mlp[0].weight.shape == (4, 16) and mlp[0].bias is None
    assert mlp[2].weight.shape == (8, 4) and mlp[2].bias.shape == (8,)
    assert AF.prototype_mlp(1)[0].weight.shape == (1, 2)


def test_pooling_float32_under_autocast():
    feat = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    probs = torch.rand(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = AF.soft_class_pool(probs, feat)
        logits = AF.cosine_logits(feat, torch.randn(3, 4), 15.0)
    assert out.dtype == torch.float32 and logits.dtype == torch.float32


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
    from adaptive_heads.upsampled_ce import upsampled_sigmoid_stats

    logits = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 7, 5))
    valid = torch.rand(2, 7, 5) > 0.3
    assert torch.autograd.gradcheck(
        lambda z: upsampled_sigmoid_stats(z, target, valid, align_corners=False, tile_elements=20), (logits,)
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
    from adaptive_heads.upsampled_ce import upsampled_sigmoid_stats

    torch.manual_seed(0)
    logits = torch.randn(2, 4, *src, requires_grad=True)
    target = torch.randint(0, 4, (2, *dst))
    valid = torch.rand(2, *dst) > 0.3
    prob = torch.sigmoid(F.interpolate(logits, size=dst, mode="bilinear", align_corners=True))
    mask = F.one_hot(target, 4).permute(0, 3, 1, 2) * valid[:, None]
    plain = (prob.sum((2, 3)), (prob * mask).sum((2, 3)))
    fused = upsampled_sigmoid_stats(logits, target, valid, align_corners=True, tile_elements=tile)
    gt, go = torch.randn(2, 4), torch.randn(2, 4)
    g_plain = torch.autograd.grad((plain[0] * gt).sum() + (plain[1] * go).sum(), logits)[0]
    g_fused = torch.autograd.grad((fused[0] * gt).sum() + (fused[1] * go).sum(), logits)[0]
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-5, atol=1e-6)


def test_class_pixel_counts():
    labels = torch.tensor([[[0, 1], [1, 3]], [[2, 2], [2, 0]]])
    valid = labels != 3
    assert AF.class_pixel_counts(labels, 3, valid).tolist() == [[1, 2, 0], [1, 0, 3]]


def test_pointwise_conv_equals_conv_including_channels_last():
    conv = torch.nn.Conv2d(6, 4, 1)
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(AF.pointwise_conv(x, conv), conv(x))
    torch.testing.assert_close(AF.pointwise_conv(x.contiguous(memory_format=torch.channels_last), conv), conv(x))
    no_bias = torch.nn.Conv2d(6, 4, 1, bias=False)
    torch.testing.assert_close(AF.pointwise_conv(x, no_bias), no_bias(x))


def test_channel_norm_value_gradient_and_zero_vectors():
    x = torch.randn(2, 5, 3000, dtype=torch.float64)
    x[0, :, 7] = 0
    torch.testing.assert_close(AF.channel_norm(x), torch.linalg.vector_norm(x, dim=1, keepdim=True))
    small = x[:, :, :9].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: AF.channel_norm(z[:, :, 1:]), (small,))
    (grad,) = torch.autograd.grad(AF.channel_norm(small).sum(), small)
    assert torch.equal(grad[0, :, 7], torch.zeros(5, dtype=torch.float64))


def test_pointwise_conv_channel_dropout_equals_dropout2d_with_same_seed():
    conv = torch.nn.Conv2d(6, 4, 1)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    torch.manual_seed(1)
    ours = AF.pointwise_conv(x, conv, 0.3)
    torch.manual_seed(1)
    ref = conv(F.dropout2d(x, 0.3))
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    torch.manual_seed(1)
    strided = AF.pointwise_conv(x.contiguous(memory_format=torch.channels_last), conv, 0.3)
    torch.testing.assert_close(strided, ref)
