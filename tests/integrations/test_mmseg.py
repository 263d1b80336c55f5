"""mmseg 1.x integration (skips without mmseg; mmseg needs mmcv compiled with its ops)."""

import pytest
import torch

from adaptive_heads.registry import HEADS

mmseg = pytest.importorskip("mmseg")
pytest.importorskip("mmcv.ops")  # mmcv-lite lacks the compiled ops mmseg.models imports


def _model(head_type: str, adaptive: dict):
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    import adaptive_heads.integrations.mmseg  # noqa: F401  (registers the Adaptive* heads)

    cfg = ConfigDict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3, size=(64, 64)),
        backbone=dict(type="ResNetV1c", depth=18, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                      strides=(1, 2, 1, 1), norm_cfg=dict(type="BN"), contract_dilation=True),
        decode_head=dict(type=head_type, adaptive=adaptive, in_channels=512, in_index=3, channels=32, num_convs=1,
                         concat_input=False, dropout_ratio=0.1, num_classes=5, norm_cfg=dict(type="BN"),
                         align_corners=False, loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0)),
        train_cfg=dict(),
        test_cfg=dict(mode="whole"),
    )  # fmt: skip
    torch.manual_seed(0)
    return MODELS.build(cfg)


def _samples(batch: int = 2, size: int = 64):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for _ in range(batch):
        s = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, size, size)))
        samples.append(s)
    return samples


@pytest.mark.parametrize("kind", [cls.__name__ for cls in HEADS.values()])
def test_adaptive_fcn_head_trains_and_predicts(kind):
    from mmseg.registry import MODELS

    model = _model("AdaptiveFCNHead", dict(type=kind))
    for name in ("AdaptiveUPerHead", "AdaptiveSegformerHead", "AdaptiveOCRHead", "AdaptiveDepthwiseSeparableASPPHead"):
        assert name in MODELS.module_dict
    head = model.decode_head.conv_seg
    assert type(head).__name__ == kind
    model.train()
    images, samples = torch.randn(2, 3, 64, 64), _samples()
    losses = model.loss(images, samples)
    assert {"decode.loss_ce", "decode.loss_adaptive"} <= set(losses)
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    model.eval()
    with torch.no_grad():
        preds = model.predict(images, _samples())
    assert preds[0].pred_sem_seg.data.shape == (1, 64, 64)
