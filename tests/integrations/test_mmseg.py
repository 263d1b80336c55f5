"""mmseg 1.x integration (skips without mmseg and mmcv).

mmcv's compiled ops are not needed: with ``mmcv-lite`` (pure Python, what CI installs; building mmcv's ops from
source takes over 40 minutes on 2 cores) a stand-in for the extension module lets ``mmseg.models`` import, and
any compiled op called by mistake raises. The models built here (ResNetV1c, FCN head, slide inference) use none.
"""

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from adaptive_heads.registry import HEADS

pytest.importorskip("mmcv")
pytest.importorskip("mmengine")


def _stand_in_for_compiled_ops() -> None:
    """Register ``mmcv._ext`` when mmcv was installed without its compiled ops; every op in it raises."""
    if importlib.util.find_spec("mmcv._ext") is not None:
        return

    def missing(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise RuntimeError(f"mmcv compiled op {name!r} called in a test that runs on mmcv-lite")

        return op

    ext = types.ModuleType("mmcv._ext")
    ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)  # find_spec() callers (mmengine's Config)
    ext.__getattr__ = missing  # type: ignore[method-assign]
    sys.modules["mmcv._ext"] = ext


_stand_in_for_compiled_ops()
mmseg = pytest.importorskip("mmseg")


def _model(
    head_type: str,
    adaptive: dict,
    segmentor: str = "EncoderDecoder",
    test_cfg: dict | None = None,
    aux: bool | dict = False,
    dropout_ratio: float = 0.1,
):
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    import adaptive_heads.integrations.mmseg  # noqa: F401  (registers the Adaptive* heads)

    decode_head = dict(type=head_type, in_channels=512, in_index=3, channels=32, num_convs=1, concat_input=False,
                       dropout_ratio=dropout_ratio, num_classes=5, norm_cfg=dict(type="BN"), align_corners=False,
                       loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0))  # fmt: skip
    if adaptive:
        decode_head["adaptive"] = adaptive
    cfg = ConfigDict(
        type=segmentor,
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3, size=(64, 64)),
        backbone=dict(type="ResNetV1c", depth=18, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                      strides=(1, 2, 1, 1), norm_cfg=dict(type="BN"), contract_dilation=True),
        decode_head=decode_head,
        train_cfg=dict(),
        test_cfg=test_cfg or dict(mode="whole"),
    )  # fmt: skip
    if aux:  # mmseg's usual auxiliary FCN head on stage 3, loss weight 0.4
        cfg.auxiliary_head = dict(
            type="FCNHead", in_channels=256, in_index=2, channels=16, num_convs=1, concat_input=False,
            dropout_ratio=0.1, num_classes=5, norm_cfg=dict(type="BN"), align_corners=False,
            loss_decode=dict(type="CrossEntropyLoss", loss_weight=0.4),
        )  # fmt: skip
        if isinstance(aux, dict):
            cfg.auxiliary_head.update(aux)
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


@pytest.mark.parametrize("kind", ["ContextAwareClassifier", "SSAClassifier"])
def test_adaptive_encoder_decoder_slide_with_image_context(kind):
    from adaptive_heads import slide_inference

    cfg = dict(mode="slide", crop_size=(48, 48), stride=(32, 32), context="image")
    model = _model("AdaptiveFCNHead", dict(type=kind), "AdaptiveEncoderDecoder", cfg).eval()
    images = torch.randn(1, 3, 80, 96)
    metas = [dict(img_shape=(80, 96), ori_shape=(80, 96), pad_shape=(80, 96))]
    with torch.no_grad():
        image = model.slide_inference(images, metas)
        model.test_cfg.context = "tile"
        tile = model.slide_inference(images, metas)
        plain = super(type(model), model).slide_inference(images, metas)  # mmseg's own

        def run(crop):
            return model.encode_decode(crop, [{**metas[0], "img_shape": crop.shape[2:]}])

        ours = slide_inference(model, images, 48, 32, context="image", head="decode_head.conv_seg", forward=run)
    assert image.shape == (1, 5, 80, 96)
    torch.testing.assert_close(tile, plain, rtol=1e-5, atol=1e-5)  # "tile" is mmseg's slide inference
    torch.testing.assert_close(image, ours)
    assert (image - tile).abs().max() > 1e-4


# ----------------------------------------------------------------------------- the seams (issue 22)
def _snapshot(head: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def _assert_official_init(head: torch.nn.Module, constructed: dict) -> None:
    """After mmengine's init_weights: the coarse conv N(0, 0.01²) / 0, every other layer as constructed."""
    for key, value in head.state_dict().items():
        if key.startswith("conv_seg."):
            continue
        torch.testing.assert_close(value, constructed[key], rtol=0, atol=0, msg=f"{key} was re-initialised")
    if hasattr(head, "conv_seg"):
        assert abs(float(head.conv_seg.weight.detach().std()) - 0.01) < 0.003
        assert torch.count_nonzero(head.conv_seg.bias) == 0


@pytest.mark.parametrize("kind", [cls.__name__ for cls in HEADS.values()])
def test_init_weights_of_an_adaptive_decode_head_keeps_the_official_init(kind):
    model = _model("AdaptiveFCNHead", dict(type=kind))
    head = model.decode_head.conv_seg
    constructed = _snapshot(head)
    model.init_weights()  # what Runner.train() calls: the decode head's init_cfg overrides conv_seg
    _assert_official_init(head, constructed)


@pytest.mark.parametrize("name", list(HEADS))
def test_init_weights_after_replace_classifier_keeps_the_official_init(name):
    from adaptive_heads import replace_classifier

    model = _model("FCNHead", {}, aux=True)
    assert model.decode_head.init_cfg["override"]["name"] == "conv_seg"  # mmseg's Normal(std=0.01) on it
    torch.manual_seed(7)
    replace_classifier(model, HEADS[name], include_aux=True)
    torch.manual_seed(7)
    fresh = HEADS[name](32, 5)
    head = model.decode_head.conv_seg
    constructed = _snapshot(head)
    assert all(torch.equal(v, constructed[k]) for k, v in fresh.state_dict().items() if not k.startswith("conv_seg."))
    model.init_weights()
    _assert_official_init(head, constructed)
    assert model.adaptive_head_paths == ["decode_head.conv_seg", "auxiliary_head.conv_seg"]
    assert model.adaptive_head_weights == {"auxiliary_head.conv_seg": 0.4}  # the aux head's loss_weight
    if name != "proto":  # mmseg's decode-head dropout moved onto the coarse path
        assert isinstance(model.decode_head.dropout, torch.nn.Identity) and head.dropout.p == 0.1


def test_adaptive_decode_head_takes_the_dropout_ratio_and_weighs_an_auxiliary_head():
    model = _model("AdaptiveFCNHead", dict(type="ContextAwareClassifier"), dropout_ratio=0.25)
    assert model.decode_head.conv_seg.dropout.p == 0.25
    model = _model("AdaptiveFCNHead", dict(type="ContextAwareClassifier"), dropout_ratio=-1)
    assert isinstance(model.decode_head.conv_seg.dropout, torch.nn.Identity)  # OCR-style: none
    model = _model("FCNHead", {}, aux=dict(type="AdaptiveFCNHead", adaptive=dict(type="ContextAwareClassifier")))
    model.train()
    torch.manual_seed(0)
    losses = model.loss(torch.randn(2, 3, 64, 64), _samples())
    head = model.auxiliary_head
    assert head._ce_weight() == 0.4 and "aux.loss_adaptive" in losses


def test_dropout_shared_with_other_layers_stays_and_protoseg_keeps_the_decode_heads_dropout():
    from mmseg.models.decode_heads import DAHead, FCNHead

    from adaptive_heads.replace import feeding_dropout

    da = DAHead(in_channels=16, channels=8, pam_channels=4, num_classes=5, dropout_ratio=0.1)
    assert feeding_dropout(da, "conv_seg") is None  # DAHead's dropout also feeds pam_cls_seg and cam_cls_seg
    fcn = FCNHead(in_channels=16, channels=8, num_classes=5, dropout_ratio=0.1)
    assert feeding_dropout(fcn, "conv_seg") == "dropout"

    model = _model("AdaptiveFCNHead", dict(type="PrototypeClassifier"))
    head = model.decode_head.train()
    feat = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert not torch.equal(head.cls_seg(feat), head.cls_seg(feat))  # Dropout2d before the embedding
        head.eval()
        assert torch.equal(head.cls_seg(feat), head.cls_seg(feat))
