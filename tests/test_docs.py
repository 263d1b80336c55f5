"""Every ``python`` block of README.md and docs/ runs as written.

A block runs in a fresh namespace, in a temporary working folder. The names a block leaves to the reader (its
comments call them *yours*: ``loader``, ``dataset``, ``model``...) come from the setup named in the HTML comment
just above it, ``<!-- docs-test: setup=NAME -->``, as small random data; ``<!-- docs-test: skip REASON -->``
marks a block that cannot run (none does today). A setup skips the block where an optional library is absent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(?:<!-- docs-test: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)\n```", re.DOTALL)


def _blocks() -> list[tuple[str, str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start("code")].count("\n") + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", match["mark"] or "", match["code"]))
    return found


BLOCKS = _blocks()


def _batches(count: int = 2, classes: int = 12, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        target = torch.randint(0, classes, (2, size, size), generator=g)
        target[:, :4] = 255
        batches.append((torch.randn(2, 3, size, size, generator=g), target))
    return batches


# ----------------------------------------------------------------------------- setups: the reader's names
def _loader() -> dict:
    """Only the data: the block builds its own model."""
    return {"loader": _batches()}


def _torchvision_fcn() -> dict:
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    batches = _batches(classes=5)
    model = segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=5)
    return {"model": model, "loader": batches, "images": batches[0][0], "large_images": torch.randn(1, 3, 96, 128)}


def _adaptive_model() -> dict:
    from adaptive_heads import replace_classifier

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 5, 1))
    return {"model": replace_classifier(model, "cac", num_classes=5), "images": torch.randn(1, 3, 700, 900)}


def _features_150() -> dict:
    return {"feat": torch.randn(2, 512, 16, 16), "target": torch.randint(0, 150, (2, 64, 64))}


def _export() -> dict:
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        pytest.skip("ONNX export with dynamo=True needs torch >= 2.5 (docs: Compatibility)")
    for module in ("onnx", "onnxscript"):
        pytest.importorskip(module)
    return {}


def _hf_dataset() -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    batches = _batches(classes=12)
    items = [(image, labels) for images, target in batches for image, labels in zip(images, target, strict=True)]
    return {"dataset": [{"pixel_values": image, "labels": labels} for image, labels in items]}


def _mmseg() -> dict:
    pytest.importorskip("mmcv")
    pytest.importorskip("mmengine")
    import adaptive_heads.integrations.mmcv_lite  # noqa: F401  (CI's mmcv-lite: docs, "From mmseg")

    pytest.importorskip("mmseg")
    return {}


def _mmseg_model() -> dict:
    """An mmseg ``EncoderDecoder`` (ResNetV1c-18, FCN decode and auxiliary heads, 5 classes) and two mmseg batches."""
    _mmseg()
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules()
    head = dict(type="FCNHead", num_convs=1, concat_input=False, dropout_ratio=0.1, num_classes=5,
                norm_cfg=dict(type="BN"), align_corners=False)  # fmt: skip
    torch.manual_seed(0)
    model = MODELS.build(
        dict(
            type="EncoderDecoder",
            data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                                   std=[58.395, 57.12, 57.375], bgr_to_rgb=True, size=(64, 64)),
            backbone=dict(type="ResNetV1c", depth=18, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                          strides=(1, 2, 1, 1), norm_cfg=dict(type="BN"), contract_dilation=True),
            decode_head=dict(head, in_channels=512, in_index=3, channels=32,
                             loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0)),
            auxiliary_head=dict(head, in_channels=256, in_index=2, channels=16,
                                loss_decode=dict(type="CrossEntropyLoss", loss_weight=0.4)),
            train_cfg=dict(),
            test_cfg=dict(mode="whole"),
        )
    )  # fmt: skip
    loader = []
    for images, target in _batches(classes=5):
        samples = []
        for labels in target:
            sample = SegDataSample(metainfo={"img_shape": (64, 64), "ori_shape": (64, 64), "pad_shape": (64, 64)})
            sample.gt_sem_seg = PixelData(data=labels[None])
            samples.append(sample)
        inputs = [(image * 50 + 128).clamp(0, 255).to(torch.uint8) for image in images]
        loader.append({"inputs": inputs, "data_samples": samples})
    return {"model": model, "loader": loader}


def _train_the_mmseg_config(code: str, tmp_path: Path) -> None:
    """Build the config's model with mmseg's registry and train one step (a 64-px crop, random images)."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules()
    path = tmp_path / "config.py"
    path.write_text(code)
    cfg = Config.fromfile(str(path))  # imports custom_imports: registers the Adaptive* heads
    cfg.model.data_preprocessor.size = (64, 64)
    for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
        head.norm_cfg = dict(type="BN", requires_grad=True)  # SyncBN needs a process group
    cfg.model.backbone.norm_cfg = dict(type="BN", requires_grad=True)
    model = MODELS.build(cfg.model)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    samples = []
    for _ in range(2):
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 19, (1, 64, 64)))
        sample.set_metainfo({"img_shape": (64, 64), "ori_shape": (64, 64), "pad_shape": (64, 64)})
        samples.append(sample)
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    data = {"inputs": images, "data_samples": samples}
    model.train()
    log = model.train_step(data, optim_wrapper)
    assert {"decode.loss_ce", "decode.loss_adaptive", "aux.loss_adaptive"} <= set(log), sorted(log)
    assert all(torch.isfinite(v) for v in log.values())


SETUPS: dict[str, Callable[[], dict]] = {
    "loader": _loader,
    "torchvision_fcn": _torchvision_fcn,
    "adaptive_model": _adaptive_model,
    "features_150": _features_150,
    "export": _export,
    "hf_dataset": _hf_dataset,
    "mmseg": _mmseg,
    "mmseg_model": _mmseg_model,
}
#: the libraries a block imports and their setups do not already ask for
NEEDS = {
    "segmentation_models_pytorch": "segmentation_models_pytorch",
    "torchvision": "torchvision",
    "mmengine": "mmengine",
}


def test_every_block_is_found_and_marked_with_a_known_setup():
    assert len(BLOCKS) >= 9, [where for where, _, _ in BLOCKS]
    for where, mark, _ in BLOCKS:
        if mark:
            kind, _, value = mark.partition("=") if mark.startswith("setup=") else mark.partition(" ")
            assert kind in ("setup", "skip"), where
            assert kind == "skip" or value in SETUPS, f"{where}: unknown setup {value!r}"


@pytest.mark.parametrize(("where", "mark", "code"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_runs(where, mark, code, tmp_path, monkeypatch):
    if mark.startswith("skip"):
        pytest.skip(f"{where}: {mark}")
    for module, package in NEEDS.items():
        if f"import {module}" in code or f"from {module}" in code:
            pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)  # files a block writes ("head.onnx", "segformer-cac/") land here
    setup = mark.partition("=")[2] if mark.startswith("setup=") else ""
    namespace = {"__name__": "__docs__", **(SETUPS[setup]() if setup else {})}
    if setup == "mmseg":
        _train_the_mmseg_config(code, tmp_path)
        return
    exec(compile(code, where, "exec"), namespace)
