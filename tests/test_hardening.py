"""Cross-head guarantees: input contract, numerical robustness, mixed precision, determinism, state, and
property-based tests over random shapes (hypothesis)."""

import copy
import pickle

import pytest
import torch

import adaptive_heads as ah

from .conftest import make_head, make_loss

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# documented autocast tolerances on the logits (|Δ| against float32, tau = 15 for CAC/SSA)
AUTOCAST_TOL = {torch.bfloat16: 0.25, torch.float16: 0.05}


def build(name, c=6, n=4, seed=0, **kw):
    torch.manual_seed(seed)
    return make_head(name, c, n, **kw), make_loss(name)


def finite_step(head, loss_fn, feat, target):
    feat = feat.clone().requires_grad_(True)
    head.train()
    terms = loss_fn(head(feat, target), target)
    for k, v in terms.items():
        assert torch.isfinite(v).all(), k
    terms["loss"].backward()
    assert torch.isfinite(feat.grad).all()
    for name, p in head.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    return terms


# ----------------------------------------------------------------------------- input contract
def test_input_contract_messages(head_name):
    head, loss_fn = build(head_name)
    feat = torch.randn(2, 6, 4, 5)
    cases = [
        (lambda: head(feat[0]), ValueError, "feat must have shape \\[B, C, h, w\\]"),
        (lambda: head(torch.randn(2, 7, 4, 5)), ValueError, "feat has 7 channels .* in_channels=6"),
        (lambda: head(feat.long()), TypeError, "feat must be a floating-point tensor"),
        (lambda: head(feat[:0]), ValueError, "feat must be non-empty"),
        (lambda: head(feat, torch.zeros(2, 8, 8)), TypeError, "target must be an integer tensor"),
        (lambda: head(feat, torch.full((2, 8, 8), 4)), ValueError, "target has labels outside \\[0, 4\\)"),
        (lambda: head(feat, torch.zeros(3, 8, 8, dtype=torch.long)), ValueError, "target has batch size 3"),
        (lambda: head(feat, torch.zeros(2, 8, dtype=torch.long)), ValueError, "target must have shape \\[B, H, W\\]"),
        (lambda: head(feat, torch.zeros(2, 8, 8, dtype=torch.long, device="meta")), ValueError, "target is on meta"),
        (lambda: head("x"), TypeError, "feat must be a torch.Tensor"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    out = head(feat, torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="target has labels outside"):
        loss_fn(out, torch.full((2, 8, 8), -3))


def test_debug_mode_rejects_nan_features(head_name):
    head, _ = build(head_name)
    feat = torch.randn(1, 6, 3, 3)
    feat[0, 0, 0, 0] = float("nan")
    head(feat)  # not checked by default (a full pass over the features)
    ah.set_debug(True)
    try:
        with pytest.raises(ValueError, match="NaN or Inf"):
            head(feat)
    finally:
        ah.set_debug(False)


def test_one_nan_feature_pixel_spreads_as_the_input_contract_says(head_name):
    """CAC and SSA-Seg pool every pixel of an image into its class prototypes: one NaN pixel makes every logit of
    that image NaN (the other images stay finite); ProtoSeg's logits are per pixel (docs/reliability.md)."""
    head, _ = build(head_name)
    feat = torch.randn(2, 6, 3, 3)
    feat[0, 0, 1, 1] = float("nan")
    logits = head.eval()(feat)
    assert torch.isfinite(logits[1]).all()
    if head_name == "proto":
        assert logits[0, :, 1, 1].isnan().all() and torch.isfinite(logits[0]).sum() == logits[0].numel() - 4
    else:
        assert logits[0].isnan().all()


def test_channels_last_and_non_contiguous_inputs(head_name):
    head, loss_fn = build(head_name, **({"update_prototypes": False} if head_name == "proto" else {"dropout": 0.0}))
    feat = torch.randn(2, 6, 5, 7)
    target = torch.randint(0, 4, (2, 10, 14))
    head.eval()
    expected = head(feat)
    torch.testing.assert_close(head(feat.contiguous(memory_format=torch.channels_last)), expected)
    strided = torch.randn(2, 6, 7, 5).transpose(2, 3)
    assert not strided.is_contiguous()
    torch.testing.assert_close(head(strided), head(strided.contiguous()))
    head.train()
    a = loss_fn(head(feat, target.transpose(1, 2).contiguous().transpose(1, 2)), target)
    b = loss_fn(head(feat, target), target)
    torch.testing.assert_close(a["loss"], b["loss"])


# ----------------------------------------------------------------------------- numerical robustness
@pytest.mark.parametrize(
    "case",
    ["all_ignored", "single_class", "absent_classes", "zero_features", "huge_features", "tiny_1x1", "tiny_2x3"],
)
def test_robust_cases_are_finite(head_name, case):
    head, loss_fn = build(head_name)
    h, w = {"tiny_1x1": (1, 1), "tiny_2x3": (2, 3)}.get(case, (6, 5))
    feat = torch.randn(2, 6, h, w)
    target = torch.randint(0, 4, (2, 4 * h + 1, 4 * w + 3))  # odd, non-multiple label size
    if case == "all_ignored":
        target.fill_(255)
    elif case == "single_class":
        target.fill_(2)
    elif case == "absent_classes":
        target = target.clamp_max(1)
    elif case == "zero_features":
        feat.zero_()
    elif case == "huge_features":
        feat *= 1e4
    terms = finite_step(head, loss_fn, feat, target)
    if case == "all_ignored":
        assert terms["ce"].item() == 0.0


@pytest.mark.parametrize("c,n", [(1, 2), (3, 2), (1, 3)])  # n = 1 is refused (tests/test_seams.py)
def test_degenerate_channel_and_class_counts(head_name, c, n):
    head, loss_fn = build(head_name, c=c, n=n)
    target = torch.randint(0, n, (2, 9, 7))
    finite_step(head, loss_fn, torch.randn(2, c, 3, 4), target)
    head.eval()
    assert head(torch.randn(2, c, 3, 4)).shape == (2, n, 3, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_within_documented_tolerance(head_name, dtype):
    head, loss_fn = build(head_name, n=7)
    feat = torch.randn(2, 6, 8, 8).relu()
    target = torch.randint(0, 7, (2, 32, 32))
    head.eval()
    reference = head(feat)
    with torch.autocast("cpu", dtype=dtype):
        low = head(feat.to(dtype))
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() <= AUTOCAST_TOL[dtype]
    with torch.autocast("cpu", dtype=dtype):
        assert torch.isfinite(head(feat.to(dtype) * 1e4)).all()
    head.train()
    with torch.autocast("cpu", dtype=dtype):
        terms = loss_fn(head(feat.to(dtype) * 1e3, target), target)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])  # fmt: skip
def test_deterministic_training_steps(head_name, device):
    """``torch.use_deterministic_algorithms(True)``: no op raises, two runs are bit-identical (on CUDA,
    CUBLAS_WORKSPACE_CONFIG is set by the root conftest before CUDA starts)."""

    def run():
        head, loss_fn = build(head_name, seed=3)
        head, loss_fn = head.to(device), loss_fn.to(device)
        if head_name == "proto":
            head.generator = torch.Generator(device=device).manual_seed(0)
        opt = torch.optim.SGD(head.parameters(), lr=0.1)
        torch.manual_seed(7)
        feat = torch.randn(2, 6, 5, 5).to(device)
        target = torch.randint(0, 4, (2, 20, 20)).to(device)
        for _ in range(2):
            opt.zero_grad()
            loss_fn(head(feat, target), target)["loss"].backward()
            opt.step()
        return copy.deepcopy(head.state_dict())

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = run(), run()
    finally:
        torch.use_deterministic_algorithms(previous)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_state_round_trips(head_name):
    head, loss_fn = build(head_name)
    feat = torch.randn(2, 6, 4, 4)
    finite_step(head, loss_fn, feat, torch.randint(0, 4, (2, 8, 8)))
    head.eval()
    expected = head(feat)
    fresh, _ = build(head_name, seed=99)
    fresh.load_state_dict(head.state_dict())
    fresh.eval()
    for other in (fresh, pickle.loads(pickle.dumps(head)), copy.deepcopy(head)):
        torch.testing.assert_close(other(feat), expected)
    double = copy.deepcopy(head).to(torch.float64)
    assert all(t.dtype == torch.float64 for t in double.state_dict().values() if t.is_floating_point())
    torch.testing.assert_close(double(feat.double()).float(), expected, rtol=1e-4, atol=1e-4)
    result = fresh.load_official_state_dict({f"decode_head.{k}": v for k, v in head.state_dict().items()})
    assert result.missing_keys == [] and result.unexpected_keys == []


# ----------------------------------------------------------------------------- property-based
@st.composite
def problems(draw):
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 8))
    n = draw(st.integers(2, 6))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    scale = draw(st.sampled_from([1, 2, 3, 4]))
    ignore_frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**16))
    return b, c, n, h, w, scale, ignore_frac, seed


def _problem(b, c, n, h, w, scale, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(b, c, h, w, generator=g)
    target = torch.randint(0, n, (b, h * scale, w * scale), generator=g)
    target[torch.rand(target.shape, generator=g) < ignore_frac] = 255
    return feat, target


@settings(max_examples=15, deadline=None)
@given(p=problems())
def test_property_finite_and_shaped(head_name, p):
    b, c, n, h, w, *_ = p
    feat, target = _problem(*p)
    head, loss_fn = build(head_name, c=c, n=n)
    finite_step(head, loss_fn, feat, target)
    head.eval()
    logits = head(feat)
    assert logits.shape == (b, n, h, w) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["cac", "ssa"])
@settings(max_examples=10, deadline=None)
@given(p=problems())
def test_property_inference_is_per_image(name, p):
    feat, _ = _problem(*p)
    head, _ = build(name, c=p[1], n=p[2])
    head.eval()
    batched = head(feat)
    for i in range(feat.shape[0]):
        torch.testing.assert_close(head(feat[i : i + 1]), batched[i : i + 1], rtol=1e-4, atol=1e-4)


def _permute_classes(name, head, perm):
    with torch.no_grad():
        if name in ("cac", "ssa"):
            head.conv_seg.weight.copy_(head.conv_seg.weight[perm])
            head.conv_seg.bias.copy_(head.conv_seg.bias[perm])
        if name == "ssa":
            head.center_pos.weight.copy_(head.center_pos.weight[perm])
        if name == "proto":
            head.prototypes.copy_(head.prototypes[perm])
            head.mask_norm.weight.copy_(head.mask_norm.weight[perm])
            head.mask_norm.bias.copy_(head.mask_norm.bias[perm])


@settings(max_examples=10, deadline=None)
@given(p=problems(), perm_seed=st.integers(0, 1000))
def test_property_class_permutation_equivariance(head_name, p, perm_seed):
    _b, c, n, *_ = p
    feat, target = _problem(*p)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    kw = {"dropout": 0.0} if head_name != "proto" else {"update_prototypes": False}
    head, loss_fn = build(head_name, c=c, n=n, **kw)
    permuted = copy.deepcopy(head)
    _permute_classes(head_name, permuted, perm)
    head.eval(), permuted.eval()
    torch.testing.assert_close(permuted(feat), head(feat)[:, perm], rtol=1e-4, atol=1e-4)
    # training losses are invariant when labels are renamed consistently
    inverse = torch.argsort(perm)
    renamed = torch.where(target == 255, target, inverse[target.clamp_max(n - 1)])
    head.train(), permuted.train()
    a = loss_fn(head(feat, target), target)
    b_ = loss_fn(permuted(feat, renamed), renamed)
    for k in a:
        torch.testing.assert_close(a[k], b_[k], rtol=1e-4, atol=1e-4, msg=k)
