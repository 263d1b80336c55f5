"""The memory budget that decides between one pass and tiles (adaptive_heads.memory_budget)."""

from __future__ import annotations

import pytest
import torch

import adaptive_heads as ah
from adaptive_heads import functional as AF


def test_default_budgets_and_overrides():
    cpu = torch.device("cpu")
    assert ah.memory_budget(cpu) == 64 << 20 and ah.memory_budget(torch.device("meta")) == 4096 << 20
    ah.set_memory_budget(1 << 30, "cpu")
    try:
        assert ah.memory_budget(cpu) == 1 << 30 and ah.memory_budget(torch.device("meta")) == 4096 << 20
    finally:
        ah.set_memory_budget(None, "cpu")
    assert ah.memory_budget(cpu) == 64 << 20
    for bad in (0, -1, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="nbytes must be a positive int"):
            ah.set_memory_budget(bad, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_budget_is_a_sixteenth_of_the_device_at_least_512_mib():
    total = torch.cuda.get_device_properties(0).total_memory
    assert ah.memory_budget(torch.device("cuda")) == max(512 << 20, total // 16)


def test_a_smaller_budget_tiles_the_same_values():
    """The budget changes how a label-resolution term runs (one pass, or rows tiles: more ops), never its value."""
    from benchmarks.measure import count_aten_ops

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    target = torch.randint(0, 5, (2, 64, 64))
    results = {}
    for budget in (1 << 30, 16 << 10):
        ah.set_memory_budget(budget, "cpu")
        try:
            ops = count_aten_ops(lambda: AF.upsampled_cross_entropy(logits, target))
            loss = AF.upsampled_cross_entropy(logits, target)
            results[budget] = (ops, loss, torch.autograd.grad(loss, logits)[0])
        finally:
            ah.set_memory_budget(None, "cpu")
    (whole_ops, whole, g_whole), (tiled_ops, tiled, g_tiled) = results.values()
    assert tiled_ops > 2 * whole_ops  # the tiles launch their ops once per tile
    torch.testing.assert_close(tiled, whole)
    torch.testing.assert_close(g_tiled, g_whole)


@pytest.mark.parametrize("name", list(ah.HEADS))
def test_a_training_step_runs_the_same_ops_at_every_size(name):
    """On a device whose budget holds the pass (meta: 4 GiB) a head's training step (forward, its loss, backward)
    dispatches a fixed set of ops, whatever the image size: no tile or chunk loop."""
    from benchmarks.measure import count_aten_ops

    def step_ops(size: int) -> int:
        torch.manual_seed(0)
        model = torch.nn.Sequential(ah.HEADS[name](32, 7)).to("meta").train()
        feat = torch.randn(2, 32, size // 8, size // 8, device="meta", requires_grad=True)
        target = torch.randint(0, 7, (2, size, size), device="meta")

        def step() -> None:
            with ah.supervise(model, target) as sup:
                model(feat)
                loss = sup.loss(include_main=True)
            loss.backward()

        return count_aten_ops(step)

    assert step_ops(128) == step_ops(512) == step_ops(1024)
