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


def _record_generator_at_init_weights(head: torch.nn.Module) -> list:
    """The CPU generator's state each time mmengine calls the head's init_weights()."""
    states, own = [], head.init_weights

    def init_weights() -> None:
        states.append(torch.random.get_rng_state())
        own()

    head.init_weights = init_weights
    return states


def _assert_official_init(head: torch.nn.Module, state: torch.Tensor) -> None:
    """After mmengine's init_weights: what a fresh construction draws from the generator at the head's turn (the
    coarse conv N(0, 0.01²) / 0, every other layer as its constructor)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(state)
        options = {**head.options(), "init_std": head.init_std}
        fresh = type(head)(head.in_channels, head.num_classes, **options)
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, fresh.state_dict()[key], rtol=0, atol=0, msg=key)
    if hasattr(head, "conv_seg"):
        assert abs(float(head.conv_seg.weight.detach().std()) - 0.01) < 0.003
        assert torch.count_nonzero(head.conv_seg.bias) == 0


@pytest.mark.parametrize("kind", [cls.__name__ for cls in HEADS.values()])
def test_init_weights_of_an_adaptive_decode_head_draws_the_official_init(kind):
    model = _model("AdaptiveFCNHead", dict(type=kind))
    head = model.decode_head.conv_seg
    assert model.decode_head.init_cfg is None  # mmseg's conv_seg override is the head's own init
    states = _record_generator_at_init_weights(head)
    model.init_weights()  # what Runner.train() calls
    assert len(states) == 1
    _assert_official_init(head, states[0])


@pytest.mark.parametrize("name", list(HEADS))
def test_init_weights_after_replace_classifier_draws_the_official_init(name):
    from adaptive_heads import replace_classifier

    model = _model("FCNHead", {}, aux=True)
    assert model.decode_head.init_cfg["override"]["name"] == "conv_seg"  # mmseg's Normal(std=0.01) on it
    replace_classifier(model, HEADS[name], include_aux=True)
    head = model.decode_head.conv_seg
    states = _record_generator_at_init_weights(head)
    model.init_weights()  # mmseg's override reaches every layer of the head first, then its init_weights()
    _assert_official_init(head, states[0])
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


# ----------------------------------------------------------------------------- checkpoints and init (issue 32)
def _decode_head(num_classes: int = 5, **options):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    import adaptive_heads.integrations.mmseg  # noqa: F401

    cfg = dict(type="AdaptiveFCNHead", in_channels=16, channels=8, num_convs=1, concat_input=False,
               num_classes=num_classes, norm_cfg=dict(type="BN"), align_corners=False,
               loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0))  # fmt: skip
    return MODELS.build({**cfg, "adaptive": dict(type="ContextAwareClassifier"), **options})


def test_a_users_init_cfg_on_conv_seg_gives_the_coarse_classifiers_std():
    """init_cfg=Normal(std=0.5, override=conv_seg) reaches the coarse classifier, as adaptive=dict(init_std=0.5)."""
    init_cfg = dict(type="Normal", std=0.5, override=dict(name="conv_seg"))
    head = _decode_head(num_classes=64, init_cfg=init_cfg)
    assert head.conv_seg.init_std == 0.5 and head.init_cfg is None
    head.init_weights()
    assert abs(float(head.conv_seg.conv_seg.weight.detach().std()) - 0.5) < 0.1
    assert float(head.conv_seg.proj[0].weight.detach().abs().max()) < 0.5  # the projector kept its own init
    own = _decode_head(num_classes=64, init_cfg=dict(type="Normal", std=0.01, override=dict(name="conv_seg", type=
                       "Normal", std=0.2)), adaptive=dict(type="SSAClassifier"))  # fmt: skip
    assert own.conv_seg.init_std == 0.2


@pytest.mark.parametrize(
    ("init_cfg", "adaptive", "message"),
    [
        (
            dict(type="Kaiming", override=dict(name="conv_seg")),
            dict(type="ContextAwareClassifier"),
            r"init_cfg initialises conv_seg.*'Kaiming'.*adaptive=dict\(init_std=\.\.\.\)",
        ),
        (
            dict(type="Normal", std=0.5, override=dict(name="conv_seg")),
            dict(type="PrototypeClassifier"),
            r"PrototypeClassifier.*prototypes take adaptive=dict\(init_std",
        ),
        (
            dict(type="Normal", std=0.5, override=dict(name="conv_seg")),
            dict(type="SSAClassifier", init_std=0.3),
            r"N\(0, 0\.5²\) on conv_seg but adaptive sets init_std=0\.3",
        ),
    ],
    ids=["kaiming", "protoseg", "conflict"],
)
def test_an_init_cfg_the_head_cannot_take_is_refused_with_the_way_that_works(init_cfg, adaptive, message):
    with pytest.raises(ValueError, match=message):
        _decode_head(init_cfg=init_cfg, adaptive=adaptive)


def test_mmseg_defaults_and_adaptive_init_std_still_apply():
    assert _decode_head(adaptive=dict(type="ContextAwareClassifier", init_std=0.3)).conv_seg.init_std == 0.3
    kept = dict(type="Normal", std=0.01, override=[dict(name="conv_seg"), dict(name="convs")])
    head = _decode_head(init_cfg=kept)
    assert head.init_cfg == dict(type="Normal", std=0.01, override=dict(name="convs"))  # the other override stays


def test_load_checkpoint_fine_tunes_a_decode_head_onto_another_class_count(tmp_path, capsys):
    """mmseg's load_from: mmengine's load_checkpoint(model_for_7, checkpoint_for_5, strict=False) loads the decode
    head's convs and every adaptive tensor whose shape fits (the projectors), without advice to build 5 classes."""
    import warnings

    from mmengine.runner import load_checkpoint

    torch.manual_seed(0)
    saved = _decode_head(num_classes=5).state_dict()
    torch.save({"state_dict": saved, "meta": {}}, tmp_path / "five.pth")
    head = _decode_head(num_classes=7)
    conv_seg = head.conv_seg.conv_seg.weight.detach().clone()
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(head, str(tmp_path / "five.pth"), map_location="cpu", strict=False)
    log = capsys.readouterr().out
    assert torch.equal(head.convs[0].conv.weight, saved["convs.0.conv.weight"])
    for key in ("conv_seg.proj.0.weight", "conv_seg.proj.2.bias", "conv_seg.apd_proj.0.weight"):
        assert torch.equal(head.state_dict()[key], saved[key]), key
    assert torch.equal(head.conv_seg.conv_seg.weight, conv_seg)  # [7, C] left at its init
    assert "size mismatch" in log and "num_classes" not in log
