"""CUDA: every head against the CPU, mixed precision, no host synchronisation, torch.compile and memory
(determinism on CUDA: tests/test_hardening.py).

Skipped without CUDA (``benchmarks/gpu_check.sh`` runs this file on a GPU machine). Tolerances: float32 with TF32
off within 1e-4 of the CPU; with TF32 on (PyTorch's default for cuDNN convolutions) within 5e-2 on tau = 15
logits; autocast within the documented 0.25 (bf16) and 0.05 (fp16) of float32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from adaptive_heads import PrototypeClassifier
from adaptive_heads.registry import HEADS

from .conftest import make_head, make_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

AUTOCAST_TOL = {torch.bfloat16: 0.25, torch.float16: 0.05}


def _options(name: str) -> dict:
    """Deterministic heads: no dropout, the argmax prototype assignment."""
    return {"update_assignment": "argmax"} if HEADS[name] is PrototypeClassifier else {"dropout": 0.0}


def _problem(seed: int = 0, c: int = 32, n: int = 7):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(2, c, 24, 20, generator=g).relu()
    target = torch.randint(0, n, (2, 96, 80), generator=g)
    target[0, :10] = 255
    return feat, target


def _step(head, loss_fn, feat, target):
    feat = feat.clone().requires_grad_(True)
    terms = loss_fn(head(feat, target), target)
    terms["loss"].backward()
    grads = {k: p.grad.clone() for k, p in head.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, feat.grad, grads


@pytest.fixture
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_float32_matches_the_cpu(head_name, no_tf32):
    torch.manual_seed(0)
    cpu = make_head(head_name, 32, 7, **_options(head_name))
    gpu = copy.deepcopy(cpu).cuda()
    loss_cpu, loss_gpu = make_loss(head_name), make_loss(head_name).cuda()
    feat, target = _problem()
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        torch.testing.assert_close(gpu(feat.cuda()).cpu(), cpu(feat), rtol=1e-4, atol=1e-4)
    cpu.train(), gpu.train()
    terms_c, feat_c, grads_c = _step(cpu, loss_cpu, feat, target)
    terms_g, feat_g, grads_g = _step(gpu, loss_gpu, feat.cuda(), target.cuda())
    for key in terms_c:
        torch.testing.assert_close(terms_g[key].cpu(), terms_c[key], rtol=1e-4, atol=1e-4, msg=key)
    torch.testing.assert_close(feat_g.cpu(), feat_c, rtol=1e-4, atol=1e-4)
    for key in grads_c:
        torch.testing.assert_close(grads_g[key].cpu(), grads_c[key], rtol=1e-4, atol=1e-4, msg=key)
    for key, value in cpu.state_dict().items():  # ProtoSeg: the momentum-updated prototypes
        torch.testing.assert_close(gpu.state_dict()[key].cpu(), value, rtol=1e-4, atol=1e-4, msg=key)


def test_tf32_within_its_stated_tolerance(head_name):
    torch.manual_seed(0)
    cpu = make_head(head_name, 32, 7, **_options(head_name)).eval()
    gpu = copy.deepcopy(cpu).cuda()
    feat, _ = _problem()
    with torch.no_grad():
        assert (gpu(feat.cuda()).cpu() - cpu(feat)).abs().max() < 5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_inference_and_training(head_name, dtype):
    torch.manual_seed(0)
    head = make_head(head_name, 32, 7).cuda()
    loss_fn = make_loss(head_name).cuda()
    feat, target = (t.cuda() for t in _problem())
    head.eval()
    with torch.no_grad():
        reference = head(feat)
        with torch.autocast("cuda", dtype=dtype):
            low = head(feat.to(dtype))
    assert torch.isfinite(low).all() and (low.float() - reference).abs().max() <= AUTOCAST_TOL[dtype]
    head.train()
    with torch.autocast("cuda", dtype=dtype):
        terms = loss_fn(head(feat.to(dtype) * 1e3, target), target)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()


def test_half_model(head_name):
    from adaptive_heads import replace_classifier

    from .models import TinyFCN

    torch.manual_seed(0)
    model = replace_classifier(TinyFCN(5, 16, aux=False), lambda c, n: make_head(head_name, c, n)).cuda().half()
    images = torch.randn(2, 3, 32, 40, device="cuda", dtype=torch.float16)
    model.eval()
    with torch.no_grad():
        assert model(images)["out"].dtype == torch.float16


def test_no_host_synchronisation(head_name):
    torch.manual_seed(0)
    head = make_head(head_name, 32, 7).cuda()
    loss_fn = make_loss(head_name).cuda()
    feat, target = (t.cuda() for t in _problem())
    feat.requires_grad_(True)
    loss_fn(head(feat, target), target)["loss"].backward()  # warm-up (lazy initialisations may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn(head(feat, target), target)["loss"].backward()
        head.eval()
        with torch.no_grad():
            head(feat)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_inductor_on_cuda(head_name, no_tf32):
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = make_head(head_name, 32, 7, **_options(head_name)).cuda()
    twin = copy.deepcopy(head)
    loss_fn = make_loss(head_name).cuda()
    feat, target = (t.cuda() for t in _problem())
    head.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(twin, fullgraph=True)(feat), head(feat), rtol=1e-4, atol=1e-4)
    head.train(), twin.train()

    def step(module, f):
        return loss_fn(module(f, target), target)["loss"]

    f1, f2 = feat.clone().requires_grad_(True), feat.clone().requires_grad_(True)
    step(head, f1).backward()
    torch.compile(step, fullgraph=True)(twin, f2).backward()
    torch.testing.assert_close(f2.grad, f1.grad, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_training_memory_below_the_plain_baseline(head_name):
    """``max_memory_allocated`` of a head's training step (512 px, stride 4, n = 150, C = 512) against conv + the
    plain interpolate-and-CE baseline; the figures are printed for the report."""
    import torch.nn.functional as F

    c, n = 512, 150
    feat = torch.randn(1, c, 128, 128, device="cuda").relu()
    target = torch.randint(0, n, (1, 512, 512), device="cuda")

    def peak(fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    conv = torch.nn.Conv2d(c, n, 1).cuda()

    def baseline():
        f = feat.clone().requires_grad_(True)
        logits = F.interpolate(conv(f), size=(512, 512), mode="bilinear")
        F.cross_entropy(logits, target).backward()

    head, loss_fn = make_head(head_name, c, n).cuda(), make_loss(head_name).cuda()

    def adaptive():
        f = feat.clone().requires_grad_(True)
        loss_fn(head(f, target), target)["loss"].backward()

    baseline(), adaptive()  # warm-up
    plain, ours = peak(baseline), peak(adaptive)
    print(f"{head_name}: training peak {ours / 2**20:.0f} MiB, conv + plain CE {plain / 2**20:.0f} MiB")
    assert ours < plain


def _captured(fn, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``fn`` warmed up on a side stream (lazy initialisations, cuDNN's algorithm search), then captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def test_eval_forward_captures_in_a_cuda_graph(head_name, no_tf32):
    """Issue 41, item 7: every head's inference is one static graph (no host sync, no CPU-side branch on values):
    captured once, replayed on new features, it gives the eager logits."""
    torch.manual_seed(0)
    head = make_head(head_name, 32, 7, **_options(head_name)).cuda().eval()
    static = torch.randn(2, 32, 24, 20, device="cuda")
    out = {}

    def forward() -> None:
        with torch.no_grad():
            out["logits"] = head(static)

    graph = _captured(forward)
    fresh = torch.randn(2, 32, 24, 20, device="cuda")
    static.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], head(fresh), rtol=1e-5, atol=1e-5)


def test_training_step_captures_in_a_cuda_graph(head_name, no_tf32):
    """A static-shape training step (forward inside supervise, the head's loss, backward, an SGD step) captured as
    one CUDA graph: replays train as eager steps do (same loss on the same batch as an eager twin)."""
    from adaptive_heads import supervise

    torch.manual_seed(0)
    model = torch.nn.Sequential(make_head(head_name, 32, 7, **_options(head_name))).cuda().train()
    twin = copy.deepcopy(model)
    feat, target = (t.cuda() for t in _problem())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin)]
    out = {}

    def step(module, optimizer) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        with supervise(module, target) as sup:
            module(feat)
            loss = sup.loss(include_main=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    for m, opt in zip((model, twin), optimizers, strict=True):  # grads and momentum exist before the capture
        step(m, opt)
    graph = _captured(lambda: out.update(loss=step(model, optimizers[0])), warmup=1)
    step(twin, optimizers[1])  # the twin takes the warm-up step too (the capture itself runs nothing)
    for _ in range(2):
        graph.replay()
        eager = step(twin, optimizers[1])
        torch.testing.assert_close(out["loss"], eager, rtol=1e-4, atol=1e-5)
