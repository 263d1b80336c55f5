"""No host synchronisation on the hot path: counted with the torch profiler (device-independent).

On CPU the label-range check reads one scalar per call (it is skipped on accelerators unless debug mode is on);
with that check off, a training step (forward, every loss term, backward) and an inference call must contain no
``.item()``, ``bool(tensor)``, ``nonzero`` (boolean indexing), ``unique`` or ``masked_select``.
"""

import pytest
import torch

from adaptive_heads import validation
from benchmarks.bench_heads import HEADS
from benchmarks.measure import count_ops


@pytest.mark.parametrize("name", list(HEADS))
def test_training_step_and_inference_have_no_host_sync(name, monkeypatch):
    head_cls, loss_cls = HEADS[name]
    head, loss_fn = head_cls(16, 7), loss_cls()
    feat = torch.randn(2, 16, 12, 10, requires_grad=True)
    target = torch.randint(0, 7, (2, 48, 40))
    target[0, :5] = 255

    def step():
        loss_fn(head(feat, target), target)["loss"].backward()

    assert count_ops(step)["syncs"] == 2  # the CPU label-range checks of the head and the loss
    monkeypatch.setattr(validation, "_value_checks", lambda t: False)  # as on an accelerator
    assert count_ops(step)["syncs"] == 0
    head.eval()
    with torch.no_grad():
        assert count_ops(lambda: head(feat))["syncs"] == 0
