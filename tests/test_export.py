"""Deployment: every head's inference path exports with torch.export, to ONNX (checked with onnxruntime), and
traces to TorchScript; dynamic batch and spatial size."""

import io

import pytest
import torch

from .conftest import TORCH_VERSION, make_head


def _head(name, **options):
    torch.manual_seed(0)
    return make_head(name, 8, 5, **options).strip_training_layers().eval()


def _inputs():
    return torch.randn(2, 8, 6, 7).relu(), torch.randn(3, 8, 9, 5).relu()


@pytest.mark.parametrize("kernel", [1, 3])
def test_torch_export_dynamic_shapes(head_name, kernel):
    if kernel != 1 and head_name == "proto":
        pytest.skip("ProtoSeg has no coarse classifier (a k×k model conv is replaced like a 1×1 one)")
    if kernel != 1 and TORCH_VERSION < (2, 5):
        pytest.skip("torch.export with dynamic shapes of a k×k coarse classifier needs torch >= 2.5")
    head = _head(head_name, **({"kernel_size": kernel} if kernel != 1 else {}))
    feat, other = _inputs()
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("h", min=2, max=1024),
            3: torch.export.Dim("w", min=2, max=1024)}  # fmt: skip
    exported = torch.export.export(head, (feat,), dynamic_shapes={"feat": dims})
    module = exported.module()
    for x in (feat, other):
        torch.testing.assert_close(module(x), head(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(TORCH_VERSION < (2, 5), reason="torch.onnx.export(dynamo=True) needs torch >= 2.5")
def test_onnx_export_matches_onnxruntime(head_name):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    head = _head(head_name)
    feat, other = _inputs()
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("h", min=2, max=1024),
            3: torch.export.Dim("w", min=2, max=1024)}  # fmt: skip
    program = torch.onnx.export(head, (feat,), dynamo=True, dynamic_shapes={"feat": dims}, input_names=["feat"])
    buffer = io.BytesIO()
    program.save(buffer)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for x in (feat, other):
        (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(onnx_out), head(x), rtol=1e-4, atol=1e-4)


def test_torchscript_trace(head_name):
    head = _head(head_name)
    feat, other = _inputs()
    with torch.no_grad():
        traced = torch.jit.trace(head, (feat,), check_trace=False)
        for x in (feat, other):
            torch.testing.assert_close(traced(x), head(x), rtol=1e-5, atol=1e-5)
