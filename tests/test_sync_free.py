"""No host synchronisation on the hot path, proven on a CPU-only machine.

1. Counted with the torch profiler: on CPU the label-range check reads one scalar per call (it is skipped on
   accelerators unless debug mode is on); with that check off, a training step (forward, every loss term,
   backward) and an inference call contain no ``.item()``, ``bool(tensor)``, ``nonzero``, ``unique`` or
   ``masked_select``.
2. On the ``meta`` device (no data at all), under a dispatch mode that fails on any op that reads a CPU tensor,
   copies between devices or reads a value on the host: what would be a blocking host-to-device copy or a
   stream synchronisation on CUDA (e.g. an index built on the CPU and moved to the device).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adaptive_heads import (
    PrototypeClassifier,
    PrototypeLoss,
)
from adaptive_heads import _validation as validation
from adaptive_heads.functional import upsampled_cross_entropy
from benchmarks.measure import count_ops

from .conftest import make_head, make_loss


def test_training_step_and_inference_have_no_host_sync(head_name, monkeypatch):
    head, loss_fn = make_head(head_name, 16, 7), make_loss(head_name)
    feat = torch.randn(2, 16, 12, 10, requires_grad=True)
    target = torch.randint(0, 7, (2, 48, 40))
    target[0, :5] = 255

    def step():
        loss_fn(head(feat, target), target)["loss"].backward()

    assert count_ops(step)["syncs"] == 1  # the CPU label-range check of the head (the loss reuses it)
    monkeypatch.setattr(validation, "_value_checks", lambda t: False)  # as on an accelerator
    assert count_ops(step)["syncs"] == 0
    head.eval()
    with torch.no_grad():
        assert count_ops(lambda: head(feat))["syncs"] == 0


class DeviceDiscipline(TorchDispatchMode):
    """Fails on an op that touches a tensor off ``device``, copies across devices, or reads a value on the host."""

    HOST_READS = frozenset({"_local_scalar_dense", "item", "nonzero", "unique", "_unique2", "masked_select"})

    def __init__(self, device: str = "meta") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.append(name)
        if name in self.HOST_READS:
            raise AssertionError(f"{func} reads a value on the host")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        foreign = [t for t in tensors if t.device != self.device]
        if foreign:
            raise AssertionError(
                f"{func} reads a tensor on {foreign[0].device} (shape {tuple(foreign[0].shape)}) while working on "
                f"{self.device}: a host-to-device copy per call"
            )
        target_device = kwargs.get("device")
        if target_device is not None and torch.device(target_device) != self.device:
            raise AssertionError(f"{func} creates or copies a tensor to {target_device}")
        return func(*args, **kwargs)


def test_meta_device_training_and_inference_touch_no_host_tensor(head_name, monkeypatch):
    monkeypatch.setattr(validation, "_value_checks", lambda t: False)  # what an accelerator does (no debug mode)
    head = make_head(head_name, 16, 7).to("meta")
    loss_fn = make_loss(head_name).to("meta")
    feat = torch.randn(2, 16, 12, 10, device="meta", requires_grad=True)
    target = torch.randint(0, 7, (2, 48, 40), device="meta")
    mode = DeviceDiscipline()
    with mode:
        terms = loss_fn(head(feat, target), target)
        terms["loss"].backward()
        head.eval()
        with torch.no_grad():
            head(feat)
    assert "mm" in mode.ops or "bmm" in mode.ops  # the mode really saw the computation
    assert feat.grad is not None and feat.grad.device.type == "meta"


def test_meta_device_discipline_catches_a_cpu_index():
    """The check itself: what the label resizing used to do (an index built on the CPU, then moved)."""
    x = torch.randn(4, 6, device="meta")
    index = torch.arange(3)
    with pytest.raises(AssertionError, match="creates or copies a tensor to cpu"), DeviceDiscipline():
        torch.arange(3)
    with pytest.raises(AssertionError, match="reads a tensor on cpu"), DeviceDiscipline():
        x.index_select(1, index)
    with pytest.raises(AssertionError, match="reads a tensor on cpu"), DeviceDiscipline():
        index.to("meta")


def test_class_weight_on_another_device_is_refused():
    logits = torch.randn(1, 3, 4, 4, device="meta")
    target = torch.zeros(1, 8, 8, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="class_weight must be a \\[3\\] tensor on the logits' device"):
        upsampled_cross_entropy(logits, target, class_weight=torch.ones(3))


def test_prototype_loss_moves_its_class_weight_once(monkeypatch):
    monkeypatch.setattr(validation, "_value_checks", lambda t: False)
    head = PrototypeClassifier(8, 3, num_prototypes=2).to("meta")
    loss_fn = PrototypeLoss(class_weight=torch.ones(3))  # not moved by the user
    feat = torch.randn(1, 8, 4, 4, device="meta")
    target = torch.zeros(1, 8, 8, dtype=torch.long, device="meta")
    loss_fn(head(feat, target), target)
    assert loss_fn.class_weight.device.type == "meta"
    with DeviceDiscipline():  # no copy on later calls
        loss_fn(head(feat, target), target)


def test_gumbel_generator_on_another_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(validation, "_value_checks", lambda t: False)
    head = PrototypeClassifier(8, 3, num_prototypes=2).to("meta")
    head.generator = torch.Generator().manual_seed(0)  # a CPU generator for a head elsewhere
    feat = torch.randn(1, 8, 4, 4, device="meta")
    target = torch.zeros(1, 8, 8, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"head\.generator is a cpu generator but the head runs on meta"):
        head(feat, target)
