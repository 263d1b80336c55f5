"""mmseg 1.x integration (skips without mmseg and mmcv).

mmcv's compiled ops are not needed: with ``mmcv-lite`` (pure Python, what CI installs; building mmcv's ops from
source takes over 40 minutes on 2 cores) the stand-in of ``adaptive_heads.integrations.mmcv_lite``, which the plugin
puts in place itself (docs: "From mmseg"), lets ``mmseg.models`` import, and any compiled op called by mistake
raises. The models built here (ResNetV1c, Swin, FCN and UPerNet heads, slide inference) use none.
"""

from pathlib import Path

import pytest
import torch

from adaptive_heads.registry import HEADS

pytest.importorskip("mmcv")
pytest.importorskip("mmengine")
import adaptive_heads.integrations.mmcv_lite  # noqa: F401  (before mmseg.models: mmcv-lite has no mmcv._ext)

mmseg = pytest.importorskip("mmseg")


def _model(
    head_type: str,
    adaptive: dict,
    segmentor: str = "EncoderDecoder",
    test_cfg: dict | None = None,
    aux: bool | dict = False,
    dropout_ratio: float = 0.1,
    classes: int = 5,
):
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    import adaptive_heads.integrations.mmseg  # noqa: F401  (registers the Adaptive* heads)

    decode_head = dict(type=head_type, in_channels=512, in_index=3, channels=32, num_convs=1, concat_input=False,
                       dropout_ratio=dropout_ratio, num_classes=classes, norm_cfg=dict(type="BN"), align_corners=False,
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
            dropout_ratio=0.1, num_classes=classes, norm_cfg=dict(type="BN"), align_corners=False,
            loss_decode=dict(type="CrossEntropyLoss", loss_weight=0.4),
        )  # fmt: skip
        if isinstance(aux, dict):
            cfg.auxiliary_head.update(aux)
    torch.manual_seed(0)
    return MODELS.build(cfg)


def _samples(batch: int = 2, size: int = 64, classes: int = 5):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for _ in range(batch):
        s = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), pad_shape=(size, size)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, classes, (1, size, size)))
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
    assert head.adaptive_loss_weight == 0.4 and "aux.loss_adaptive" in losses


def test_the_mmseg_dropout_rule_agrees_with_every_decode_heads_source():
    """replace_classifier moves an mmseg decode head's dropout by a rule about mmseg (BaseDecodeHead.cls_seg applies
    it right before conv_seg; DAHead and ANNHead also feed other layers with it): checked here, head by head,
    against the installed mmseg's source."""
    import inspect

    from mmseg.models import decode_heads
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead

    from adaptive_heads.replace import _mmseg_head_dropout

    checked = 0
    for name in decode_heads.__all__:
        cls = getattr(decode_heads, name)
        if not (isinstance(cls, type) and issubclass(cls, BaseDecodeHead)):
            continue
        own = [c for c in cls.__mro__ if issubclass(c, BaseDecodeHead) and c is not BaseDecodeHead]
        elsewhere = any("self.dropout" in inspect.getsource(c) for c in own)
        alone = cls.cls_seg is BaseDecodeHead.cls_seg and not elsewhere
        assert _mmseg_head_dropout(cls) == alone, name
        checked += 1
    assert checked > 20 and not _mmseg_head_dropout(decode_heads.DAHead) and _mmseg_head_dropout(decode_heads.FCNHead)


def test_replace_classifier_moves_an_mmseg_decode_heads_dropout_and_protoseg_keeps_it():
    from adaptive_heads import replace_classifier

    model = replace_classifier(_model("FCNHead", {}, aux=True), "ssa", include_aux=True)
    for head in (model.decode_head, model.auxiliary_head):
        assert isinstance(head.dropout, torch.nn.Identity) and head.conv_seg.dropout.p == 0.1

    model = _model("AdaptiveFCNHead", dict(type="PrototypeClassifier"))
    head = model.decode_head.train()
    feat = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert not torch.equal(head.cls_seg(feat), head.cls_seg(feat))  # Dropout2d before the embedding
        head.eval()
        assert torch.equal(head.cls_seg(feat), head.cls_seg(feat))


# ----------------------------------------------------------------------------- the mmseg user's path (issue 34)
EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "mmseg").glob("*.py"))


def _tiny_train_step(cfg, classes: int, size: int = 64) -> dict:
    """Build ``cfg.model`` with mmseg's registry at a ``size``-px crop on one CPU (BN for SyncBN, no pretrained
    weights) and run one ``train_step`` on random images; returns its log."""
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import MODELS

    def local(node):
        if isinstance(node, dict):
            if node.get("type") == "SyncBN":
                node["type"] = "BN"
            node.pop("pretrained", None)
            if isinstance(node.get("init_cfg"), dict) and node["init_cfg"].get("type") == "Pretrained":
                node["init_cfg"] = None
            for value in node.values():
                local(value)
        elif isinstance(node, list | tuple):
            for value in node:
                local(value)

    local(cfg.model)
    cfg.model.data_preprocessor.size = (size, size)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    data = {"inputs": [torch.randint(0, 256, (3, size, size), dtype=torch.uint8) for _ in range(2)],
            "data_samples": _samples(size=size, classes=classes)}  # fmt: skip
    model.train()
    return model.train_step(data, optim_wrapper)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_builds_and_trains_one_step(path):
    """``Config.fromfile`` resolves the ``mmseg::`` base (mmengine reads it through ``pkg_resources``: the
    ``[mmseg]`` extra keeps setuptools < 81, which still ships it) and imports ``custom_imports``."""
    from mmengine.config import Config
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(str(path))
    assert "adaptive_heads.integrations.mmseg" in cfg.custom_imports["imports"]
    assert cfg.model.decode_head.type.startswith("Adaptive")
    log = _tiny_train_step(cfg, cfg.model.decode_head.num_classes)
    assert {"decode.loss_ce", "decode.loss_adaptive"} <= set(log), sorted(log)
    assert all(torch.isfinite(v) for v in log.values())


def test_fine_tuning_from_a_plain_mmseg_checkpoint(tmp_path):
    """``load_from`` a plain FCN checkpoint (mmengine's ``load_checkpoint``, as the Runner's ``load_from``): each
    head's ``conv_seg`` becomes its coarse classifier; slide inference with image context then runs."""
    import copy

    from mmengine.config import Config
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(str(EXAMPLES[0].parent / "fcn_ssa_cityscapes_finetune.py"))
    assert cfg.load_from.endswith(".pth") and cfg.model.test_cfg.context == "tile"
    small = dict(depth=18, base_channels=8, stem_channels=8, norm_cfg=dict(type="BN"), init_cfg=None)
    heads = dict(in_channels=64, channels=8, norm_cfg=dict(type="BN"), num_classes=5)
    cfg.model.pop("pretrained", None)
    cfg.model.backbone.update(small)
    cfg.model.decode_head.update(heads)
    cfg.model.auxiliary_head.update(heads, in_channels=32)
    cfg.model.test_cfg.update(crop_size=(48, 48), stride=(32, 32), context="image")  # the other context
    plain_cfg = copy.deepcopy(cfg.model)  # mmseg's own FCN: the checkpoint's model
    plain_cfg.type = "EncoderDecoder"
    for head in (plain_cfg.decode_head, plain_cfg.auxiliary_head):
        head.type = "FCNHead"
        head.pop("adaptive")
    plain = MODELS.build(plain_cfg)
    torch.save({"state_dict": plain.state_dict(), "meta": {}}, tmp_path / "fcn.pth")
    model = MODELS.build(cfg.model)
    load_checkpoint(model, str(tmp_path / "fcn.pth"), map_location="cpu")
    for head in ("decode_head", "auxiliary_head"):
        coarse, original = getattr(model, head).conv_seg.conv_seg, getattr(plain, head).conv_seg
        torch.testing.assert_close(coarse.weight, original.weight, rtol=0, atol=0)
        torch.testing.assert_close(coarse.bias, original.bias, rtol=0, atol=0)
    samples = _samples(1, 80)
    samples[0].set_metainfo(dict(img_shape=(80, 96), ori_shape=(80, 96), pad_shape=(80, 96)))
    with torch.no_grad():
        assert model.eval().predict(torch.randn(1, 3, 80, 96), samples)[0].seg_logits.data.shape == (5, 80, 96)


def test_image_context_on_a_segmentor_that_ignores_it_is_refused():
    slide = dict(mode="slide", crop_size=(48, 48), stride=(32, 32), context="image")
    images = torch.randn(1, 3, 80, 96)
    samples = _samples(1, 80)
    samples[0].set_metainfo(dict(img_shape=(80, 96), ori_shape=(80, 96), pad_shape=(80, 96)))
    plain = _model("AdaptiveFCNHead", dict(type="ContextAwareClassifier"), "EncoderDecoder", slide).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="type='AdaptiveEncoderDecoder'"):
        plain.predict(images, samples)  # mmseg's EncoderDecoder would classify each tile by its own context
    plain.test_cfg.context = "tile"  # explicit: mmseg's per-tile behaviour
    with torch.no_grad():
        assert plain.predict(images, samples)[0].seg_logits.data.shape == (5, 80, 96)
    plain.test_cfg.context = "whole image"
    with torch.no_grad(), pytest.raises(ValueError, match="context must be 'tile' or 'image'"):
        plain.predict(images, samples)
    adaptive = _model("AdaptiveFCNHead", dict(type="ContextAwareClassifier"), "AdaptiveEncoderDecoder", slide)
    with torch.no_grad():
        assert adaptive.eval().predict(images, samples)[0].seg_logits.data.shape == (5, 80, 96)


def _loss_adaptive(loss_decode, kind: str = "ContextAwareClassifier", **head: object) -> torch.Tensor:
    """``decode.loss_adaptive`` of an ``AdaptiveFCNHead`` with this ``loss_decode``, on fixed features and labels."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    import adaptive_heads.integrations.mmseg  # noqa: F401  (registers the Adaptive* heads)

    cfg = dict(type="AdaptiveFCNHead", adaptive=dict(type=kind), in_channels=32, in_index=0, channels=16,
               num_convs=1, concat_input=False, num_classes=5, norm_cfg=dict(type="BN"), loss_decode=loss_decode,
               **head)  # fmt: skip
    torch.manual_seed(1)
    decode_head = MODELS.build(cfg).train()
    torch.manual_seed(2)
    features, samples = [torch.randn(2, 32, 16, 16)], _samples()
    return decode_head.loss(features, samples, dict())["loss_adaptive"]


def test_adaptive_terms_take_the_cross_entropys_weight_wherever_it_is_in_loss_decode():
    ce = dict(type="CrossEntropyLoss", loss_weight=0.4)
    lovasz = dict(type="LovaszLoss", loss_weight=3.0, reduction="none", per_image=False)
    first, last = _loss_adaptive([ce, lovasz]), _loss_adaptive([lovasz, ce])
    torch.testing.assert_close(first, last)  # the order of loss_decode changes nothing
    unweighted = _loss_adaptive([lovasz, ce], adaptive_loss_weight=1.0)  # explicit
    torch.testing.assert_close(last, 0.4 * unweighted)
    torch.testing.assert_close(_loss_adaptive(lovasz), 3.0 * unweighted)  # the only loss
    torch.testing.assert_close(_loss_adaptive([lovasz]), 3.0 * unweighted)  # the only loss, in a list too
    with pytest.raises(ValueError, match="adaptive_loss_weight is needed: loss_decode holds"):
        _loss_adaptive([lovasz, dict(type="DiceLoss", loss_weight=1.0)])  # several losses, no CE: ambiguous
    with pytest.raises(ValueError, match="adaptive_loss_weight must be a number >= 0"):
        _loss_adaptive(ce, adaptive_loss_weight=-1.0)
    from adaptive_heads import replace_classifier  # the same rule for an auxiliary head replace_classifier swaps

    model = replace_classifier(_model("FCNHead", {}, aux=dict(loss_decode=[lovasz, ce])), "cac", include_aux=True)
    assert model.adaptive_head_weights == {"auxiliary_head.conv_seg": 0.4}


def test_a_dice_loss_beside_ssa_segs_own_dice_warns():
    import warnings

    ce, dice = dict(type="CrossEntropyLoss", loss_weight=1.0), dict(type="DiceLoss", loss_weight=1.0)
    with pytest.warns(UserWarning, match="counts dice a second time"):
        _loss_adaptive([ce, dice], "SSAClassifier")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*counts dice a second time")
        _loss_adaptive([ce, dice], "SSAClassifier", adaptive_loss_weights=dict(dice=0.0))  # counted once
        _loss_adaptive([ce, dice], "ContextAwareClassifier")  # CAC's loss has no dice


def test_replace_classifier_inside_mmseg_warns_with_the_config_route():
    from adaptive_heads import replace_classifier

    model = replace_classifier(_model("FCNHead", {}, aux=True), "cac", include_aux=True).train()
    with pytest.warns(UserWarning, match="without labels(.|\n)*config route(.|\n)*type='AdaptiveFCNHead'"):
        model.loss(torch.randn(2, 3, 64, 64), _samples())  # no supervise(): trains without the adaptive terms


_CPU_RECIPE = """
import sys, torch
from mmengine.config import Config
from mmseg.registry import MODELS  # what mmseg's tools/train.py imports before the config

cfg = Config.fromfile(sys.argv[1])  # custom_imports: the plugin alone
from mmseg.utils import register_all_modules  # imports mmcv.ops: after the stand-in

register_all_modules()
model = MODELS.build(cfg.model).eval()
with torch.no_grad():
    assert model(torch.randn(1, 3, 32, 32), mode="tensor").shape[:2] == (1, 5)
from mmcv.ops import sigmoid_focal_loss
from adaptive_heads.integrations.mmcv_lite import CompiledOpUnavailable
try:
    sigmoid_focal_loss(torch.randn(2, 3), torch.tensor([0, 1]), 2.0, 0.25)
except CompiledOpUnavailable as error:
    print("RAISED", error)
"""

#: mmseg's own ``tools/train.py`` (shipped in the wheel under ``mmseg/.mim``), run as a script on an example config
#: unmodified, up to the Runner it builds: ``Runner.train`` (datasets, pretrained and ``load_from`` downloads) is
#: replaced by a report of the model
_TOOLS_TRAIN = """
import runpy, sys
from pathlib import Path

import mmseg
from mmengine.runner import Runner

def report(runner):
    heads = [getattr(runner.model, name, None) for name in ("decode_head", "auxiliary_head")]
    print("BUILT", [(type(h).__name__, type(h.conv_seg).__name__) for h in heads if h is not None])

Runner.train = report
script = Path(mmseg.__file__).parent / ".mim" / "tools" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
"""


def _python(tmp_path, code: str, *args: str):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "script.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script), *args], cwd=root, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300)  # fmt: skip


def _stand_in() -> bool:
    import sys

    return getattr(sys.modules["mmcv._ext"], "__adaptive_heads_stand_in__", False)


def test_the_plugin_alone_runs_on_mmcv_lite_in_a_fresh_process(tmp_path):
    """Without the compiled ops, a config that names only the plugin builds and runs (the plugin puts the stand-in
    in place itself), and a compiled op raises naming itself."""
    if not _stand_in():
        pytest.skip("the full mmcv with its compiled ops is installed: nothing to stand in for")
    config = tmp_path / "cpu_config.py"
    config.write_text(
        'custom_imports = dict(imports=["adaptive_heads.integrations.mmseg"], allow_failed_imports=False)\n'
        "model = dict(type='EncoderDecoder', data_preprocessor=dict(type='SegDataPreProcessor', size=(32, 32)),\n"
        "    backbone=dict(type='ResNetV1c', depth=18, base_channels=8, stem_channels=8, out_indices=(3,)),\n"
        "    decode_head=dict(type='AdaptiveFCNHead', adaptive=dict(type='SSAClassifier'), in_channels=64,\n"
        "        in_index=0, channels=8, num_convs=1, num_classes=5),\n"
        "    train_cfg=dict(), test_cfg=dict(mode='whole'))\n"
    )
    recipe = _python(tmp_path, _CPU_RECIPE, str(config))
    assert recipe.returncode == 0, recipe.stderr[-3000:]
    assert "RAISED mmcv's compiled op 'sigmoid_focal_loss_forward' is not available" in recipe.stdout, recipe.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_runs_as_shipped_through_mmseg_tools_train(tmp_path, path):
    """mmseg's ``tools/train.py`` on the example config as shipped, in a fresh process (nothing imported first, as a
    user's command line): the config loads and the Runner builds the adaptive decode heads."""
    if not (Path(mmseg.__file__).parent / ".mim" / "tools" / "train.py").exists():
        pytest.skip("this mmseg install does not ship tools/train.py under mmseg/.mim (a source checkout)")
    run = _python(tmp_path, _TOOLS_TRAIN, str(path), "--work-dir", str(tmp_path / "work"))
    assert run.returncode == 0, run.stderr[-3000:]
    built = [line for line in run.stdout.splitlines() if line.startswith("BUILT")]
    expected = "('AdaptiveFCNHead', 'SSAClassifier')" if "fcn_ssa" in path.name else "('AdaptiveUPerHead', 'Context"
    assert built and expected in built[0], run.stdout[-2000:]


@pytest.mark.parametrize("broken", ["mmseg.models", "cv2"])
def test_a_failed_mmseg_import_is_the_last_line_a_config_user_sees(tmp_path, broken):
    """mmengine's ``Config.fromfile`` turns an ``ImportError`` of ``custom_imports`` into advice to set
    ``PYTHONPATH``; the plugin's own error (a ``RuntimeError``) reaches the user as the last line instead, whether
    mmseg's models or mmcv itself (its OpenCV, e.g. a missing ``libGL`` on a headless machine) fail to import."""
    config = tmp_path / "config.py"
    config.write_text('custom_imports = dict(imports=["adaptive_heads.integrations.mmseg"])\n')
    script = (
        "import sys\n"
        f"sys.modules[{broken!r}] = None  # its import fails\n"
        "from mmengine.config import Config\n"
        "Config.fromfile(sys.argv[1])\n"
    )
    run = _python(tmp_path, script, str(config))
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "adaptive_heads.integrations.PluginImportError: adaptive_heads.integrations.mmseg "
        "needs mmseg's models, whose import failed: "
    ), last
    assert broken in last, last
    assert "docs/integrations.md" in last and "PYTHONPATH" not in last


def _runner(work_dir: Path, iters: int, resume: bool):
    """mmengine's Runner on a tiny ResNetV1c + AdaptiveFCNHead (CAC), 4 random 32-px images, a checkpoint every
    iteration."""
    from mmengine.dataset import pseudo_collate
    from mmengine.runner import Runner

    import adaptive_heads.integrations.mmseg  # noqa: F401  (registers AdaptiveEncoderDecoder, the heads)

    items = [{"inputs": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), "data_samples": sample}
             for sample in _samples(4, 32)]  # fmt: skip
    loader = torch.utils.data.DataLoader(items, batch_size=2, collate_fn=pseudo_collate)
    model = dict(
        type="AdaptiveEncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[0.0] * 3, std=[1.0] * 3, size=(32, 32)),
        backbone=dict(type="ResNetV1c", depth=18, base_channels=8, stem_channels=8, out_indices=(3,)),
        decode_head=dict(type="AdaptiveFCNHead", adaptive=dict(type="ContextAwareClassifier"), in_channels=64,
                         in_index=0, channels=8, num_convs=1, num_classes=5, norm_cfg=dict(type="BN")),
        train_cfg=dict(), test_cfg=dict(mode="whole"),
    )  # fmt: skip
    return Runner(
        model=model, work_dir=str(work_dir), train_dataloader=loader, default_scope="mmseg", resume=resume,
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.01, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=iters),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1, by_epoch=False)),
        experiment_name=f"run{iters}{resume}", log_level="WARNING",
    )  # fmt: skip


def test_runner_saves_and_resumes_on_this_torch(tmp_path, monkeypatch):
    """mmengine 0.10.7's checkpoints hold its HistoryBuffer logs with bound methods (``builtins.getattr``), which
    torch >= 2.6's weights-only ``torch.load`` refuses and no safe-globals list can admit soundly: resuming needs
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (docs: "From mmseg"), for checkpoints one trusts."""
    from mmengine.runner import load_checkpoint

    from ..conftest import TORCH_VERSION

    first = _runner(tmp_path, 2, resume=False)
    first.train()
    saved = {k: v.clone() for k, v in first.model.state_dict().items()}
    path = tmp_path / "iter_2.pth"
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    if TORCH_VERSION >= (2, 6):
        import pickle

        with pytest.raises(pickle.UnpicklingError, match=r"HistoryBuffer|getattr"):
            _runner(tmp_path, 3, resume=True).train()  # what an mmseg user on a current torch gets by default
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # the documented workaround
    resumed = _runner(tmp_path, 3, resume=True)
    resumed.train()
    assert resumed.iter == 3 and (tmp_path / "iter_3.pth").exists()  # went on from iteration 2
    fresh = _runner(tmp_path, 1, resume=False).model
    load_checkpoint(fresh, str(path), map_location="cpu")
    for key, value in fresh.state_dict().items():  # reloads exactly
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


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


#: the tensors of each head whose shape depends on the class count (what a fine-tune onto another count re-initialises)
_PER_CLASS = {
    "ContextAwareClassifier": ["conv_seg.conv_seg.weight", "conv_seg.conv_seg.bias"],
    "SSAClassifier": ["conv_seg.conv_seg.weight", "conv_seg.conv_seg.bias", "conv_seg.center_pos.weight"],
    "PrototypeClassifier": ["conv_seg.prototypes", "conv_seg.mask_norm.weight", "conv_seg.mask_norm.bias"],
}


def _load_from(tmp_path, capsys, saved_model, model) -> str:
    """What mmengine prints when the Runner's ``load_from`` (``load_checkpoint(..., strict=False)``) loads
    ``saved_model``'s checkpoint into ``model``; no ``UserWarning`` may be raised."""
    import warnings

    from mmengine.runner import load_checkpoint

    torch.save({"state_dict": saved_model.state_dict(), "meta": {}}, tmp_path / "saved.pth")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # none of this library's (torch 2.4's FutureWarning is torch's)
        load_checkpoint(model, str(tmp_path / "saved.pth"), map_location="cpu", strict=False)
    return capsys.readouterr().out


def _report(log: str) -> dict[str, list[str]]:
    """mmengine's report of a load: the keys of each kind of line (``size mismatch``, ``missing``, ``unexpected``),
    and every other line it printed."""
    import re

    missing = re.search(r"missing keys in source state_dict: (.*)", log)
    unexpected = re.search(r"unexpected key in source state_dict: (.*)", log)
    known = ("size mismatch for ", "missing keys in ", "unexpected key in ", "Loads checkpoint by ",
             "The model and loaded state dict do not match exactly")  # fmt: skip
    return {
        "size mismatch": sorted(re.findall(r"size mismatch for (\S+):", log)),
        "missing": sorted(missing[1].split(", ")) if missing else [],
        "unexpected": sorted(unexpected[1].split(", ")) if unexpected else [],
        "other": [line for line in log.splitlines() if line.strip() and not line.startswith(known)],
    }


@pytest.mark.parametrize("kind", list(_PER_CLASS))
def test_load_from_fine_tunes_onto_another_class_count(tmp_path, capsys, kind):
    """The Runner's ``load_from`` of a 5-class checkpoint of the same segmentor (adaptive decode head, mmseg's plain
    auxiliary FCN head) into the 7-class one: every tensor whose shape fits loads; mmengine prints a size mismatch
    for each per-class tensor and nothing else — what docs/integrations.md ("From mmseg", step 3) says."""
    saved = _model("AdaptiveFCNHead", dict(type=kind), aux=True, classes=5)
    model = _model("AdaptiveFCNHead", dict(type=kind), aux=True, classes=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = _report(_load_from(tmp_path, capsys, saved, model))
    per_class = [f"decode_head.{key}" for key in _PER_CLASS[kind]]
    per_class += ["auxiliary_head.conv_seg.weight", "auxiliary_head.conv_seg.bias"]
    assert report == {"size mismatch": sorted(per_class), "missing": [], "unexpected": [], "other": []}
    for key, value in model.state_dict().items():
        if key in per_class:
            assert torch.equal(value, before[key]), key  # left at the new head's own initialisation
        elif not key.endswith("_extra_state"):  # the saved options: a record, compared rather than copied
            assert torch.equal(value, saved.state_dict()[key]), key


@pytest.mark.parametrize("kind", list(_PER_CLASS))
def test_load_from_a_plain_checkpoint_onto_another_class_count(tmp_path, capsys, kind):
    """From mmseg's own 5-class FCN to a 7-class adaptive one: the adaptive layers are reported missing (they start
    from their own initialisation), the classifiers as size mismatches; ProtoSeg, which has no coarse classifier,
    reports the plain conv's weight and bias as unexpected. No warning of this library's."""
    plain = _model("FCNHead", {}, aux=True, classes=5)
    model = _model("AdaptiveFCNHead", dict(type=kind), aux=True, classes=7)
    report = _report(_load_from(tmp_path, capsys, plain, model))
    head = model.decode_head.conv_seg
    adaptive = {f"decode_head.conv_seg.{k}" for k, v in head.state_dict().items() if not k.endswith("_extra_state")}
    aux = ["auxiliary_head.conv_seg.bias", "auxiliary_head.conv_seg.weight"]
    assert report["other"] == []
    if kind == "PrototypeClassifier":
        assert report["size mismatch"] == aux
        assert report["unexpected"] == ["decode_head.conv_seg.bias", "decode_head.conv_seg.weight"]
        assert set(report["missing"]) == adaptive
    else:
        coarse = ["decode_head.conv_seg.conv_seg.bias", "decode_head.conv_seg.conv_seg.weight"]
        assert report["size mismatch"] == sorted(coarse + aux) and report["unexpected"] == []
        assert set(report["missing"]) == adaptive - set(coarse)
