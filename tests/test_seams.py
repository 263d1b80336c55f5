"""Where the package meets the models it is dropped into: initialisation, the host's dropout, which head is the
main one, degenerate class counts and bad labels. The real torchvision, smp, HF and mmseg behaviour is tested in
``tests/integrations``; these are the library-independent parts."""

from __future__ import annotations

import functools
import logging
import pickle
import warnings

import pytest
import torch
from torch import nn

from adaptive_heads import (
    ContextAwareClassifier,
    SSAClassifier,
    find_classifier,
    replace_classifier,
    slide_inference,
    supervise,
)
from adaptive_heads import _validation as validation
from adaptive_heads.registry import HEADS

from .conftest import assert_dropout_on_the_coarse_path_only
from .models import TinyFCN
from .test_sync_free import DeviceDiscipline


# ----------------------------------------------------------------------------- reset_parameters and init_weights
def _scramble(head):
    """What mmengine's Normal(std=0.01) override does to every layer of the module (and a zeroed buffer)."""
    with torch.no_grad():
        for module in head.modules():
            if getattr(module, "weight", None) is not None:
                module.weight.normal_(0, 0.01)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        if hasattr(head, "prototypes"):
            head.prototypes.zero_()


def _assert_same_state(head, expected):
    for (key, value), (_, want) in zip(head.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(value, want), key


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("method", ["reset_parameters", "init_weights"])
def test_reset_parameters_draws_what_a_fresh_construction_draws_under_the_same_seed(name, method):
    head = HEADS[name](32, 6)
    _scramble(head)
    torch.manual_seed(3)
    getattr(head, method)()
    torch.manual_seed(3)
    _assert_same_state(head, HEADS[name](32, 6))  # every parameter and buffer, the coarse conv's N(0, 0.01²) too
    if hasattr(head, "conv_seg"):
        assert abs(float(head.conv_seg.weight.detach().std()) - 0.01) < 0.002
        assert torch.count_nonzero(head.conv_seg.bias) == 0
    first = next(head.parameters()).clone()
    getattr(head, method)()  # from the generator as it is now: a new initialisation
    assert not torch.equal(first, next(head.parameters()))


@pytest.mark.parametrize("name", list(HEADS))
def test_a_head_built_on_the_meta_device_is_materialised_by_to_empty_and_reset_parameters(name):
    with torch.device("meta"):
        head = HEADS[name](16, 4, init_std=0.05)
    head.to_empty(device="cpu")
    torch.manual_seed(5)
    head.reset_parameters()
    torch.manual_seed(5)
    _assert_same_state(head, HEADS[name](16, 4, init_std=0.05))


def test_reset_parameters_keeps_a_kxk_coarse_classifier_and_stripped_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 3, padding=1))
    replace_classifier(model, SSAClassifier, num_classes=4, init_std=0.2)
    head = model[1]
    head.strip_training_layers()
    with torch.no_grad():
        head.center_proj.weight.zero_()
    head.init_weights()
    assert head.conv_seg.kernel_size == (3, 3) and head.gt_center_proj is None
    assert abs(float(head.conv_seg.weight.detach().std()) - 0.2) < 0.03
    assert torch.count_nonzero(head.center_proj.weight) > 0


def test_no_generator_state_is_pickled_and_heads_pickled_by_0_2_still_load():
    head = ContextAwareClassifier(8, 3, dropout=0.2)
    plain = nn.Module()
    plain.proj, plain.apd_proj, plain.conv_seg = head.proj, head.apd_proj, head.conv_seg
    overhead = len(pickle.dumps(head)) - len(pickle.dumps(plain))
    assert overhead < 2000, overhead  # the CPU generator's state alone was 5 KB
    assert not any(isinstance(v, torch.Tensor) for v in head.__dict__.values())
    old = pickle.loads(pickle.dumps(head))
    del old.__dict__["_explicit_options"]
    old.__dict__["_construction"] = (torch.random.get_rng_state(), (8, 3), {"dropout": 0.2})  # as 0.2.0 pickled
    clone = pickle.loads(pickle.dumps(old))
    assert "_construction" not in clone.__dict__ and clone.built_with("dropout") and not clone.built_with("tau")


# ----------------------------------------------------------------------------- the host's dropout
@pytest.mark.parametrize("name", ["cac", "ssa"])
def test_host_dropout_moves_to_the_coarse_path(name, caplog):
    torch.manual_seed(0)
    model = TinyFCN(width=32)  # 64 channel draws per call: two equal Dropout2d(0.1) masks have odds 1e-6
    model.classifier[3] = nn.Dropout(0.3)
    with caplog.at_level(logging.INFO, logger="adaptive_heads.replace"):
        replace_classifier(model, HEADS[name], include_aux=True)
    assert isinstance(model.classifier[3], nn.Identity) and isinstance(model.aux_classifier[3], nn.Identity)
    main, aux = model.classifier[4], model.aux_classifier[4]
    assert main.dropout.p == 0.3 and aux.dropout.p == 0.1 and main.options()["dropout"] == 0.3
    assert "'classifier.3'" in caplog.text and "absorb_dropout=False" in caplog.text
    images, target = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    assert_dropout_on_the_coarse_path_only(model, lambda: model(images), target, ["classifier.4", "aux_classifier.4"])


def test_an_explicit_head_dropout_is_kept():
    model = TinyFCN()
    replace_classifier(model, functools.partial(ContextAwareClassifier, dropout=0.0))
    assert isinstance(model.classifier[3], nn.Identity) and isinstance(model.classifier[4].dropout, nn.Identity)


def test_host_dropout_kept_on_request_and_for_protoseg():
    model = TinyFCN()
    replace_classifier(model, ContextAwareClassifier, absorb_dropout=False)
    assert isinstance(model.classifier[3], nn.Dropout)
    model = TinyFCN()
    replace_classifier(model, HEADS["proto"])  # the official ProtoSeg embeds dropped-out features
    assert isinstance(model.classifier[3], nn.Dropout)


def test_host_dropout_as_an_attribute_beside_the_classifier():
    class Decoder(nn.Module):  # HF Segformer's decode head, mmseg's decode heads, the CamVid example network
        def __init__(self) -> None:
            super().__init__()
            self.fuse = nn.Conv2d(3, 8, 1)
            self.dropout = nn.Dropout2d(0.2)
            self.classifier = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.classifier(self.dropout(self.fuse(x)))

    model = nn.Sequential(Decoder())
    replace_classifier(model, ContextAwareClassifier, path="0.classifier")
    assert isinstance(model[0].dropout, nn.Identity) and model[0].classifier.dropout.p == 0.2


class TwoBranchDecoder(nn.Module):
    """A decode head whose dropout feeds the classifier and an auxiliary branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(3, 8, 1)
        self.dropout = nn.Dropout2d(0.2)
        self.classifier = nn.Conv2d(8, 4, 1)
        self.aux = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.dropout(self.fuse(x))
        return self.classifier(x), self.aux(x)


class GuardedDecoder(nn.Module):
    """mmseg's ``cls_seg`` pattern: the dropout tested for ``None``, its output in a variable read by the classifier."""

    def __init__(self, aux: bool = False) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(3, 8, 1)
        self.dropout = nn.Dropout2d(0.2)
        self.conv_seg = nn.Conv2d(8, 4, 1)
        self.conv_aux = nn.Conv2d(8, 4, 1) if aux else None

    def cls_seg(self, feat):
        if self.dropout is not None:
            feat = self.dropout(feat)
        output = self.conv_seg(feat)
        return output

    def forward(self, x):
        feat = self.fuse(x)
        return self.cls_seg(feat)


class GuardedDecoderWithAux(GuardedDecoder):
    """As mmseg's ``DAHead``: a second method feeds another classifier from the same dropout."""

    def aux_seg(self, feat):
        feat = self.dropout(feat)
        return self.conv_aux(feat)


def test_a_dropout_that_also_feeds_an_aux_branch_stays_with_a_warning_naming_the_explicit_way():
    model = nn.Sequential(TwoBranchDecoder())
    with pytest.warns(UserWarning, match=r"'0.dropout' .* not shown to feed it alone .*reads the output") as record:
        replace_classifier(model, ContextAwareClassifier, path="0.classifier")
    message = str(record[0].message)
    assert "dropout=0.2" in message and "torch.nn.Identity()" in message and "absorb_dropout=False" in message
    assert isinstance(model[0].dropout, nn.Dropout2d) and model[0].classifier.dropout.p == 0.1  # its own default
    from adaptive_heads.replace import feeding_dropout

    assert feeding_dropout(nn.Sequential(TwoBranchDecoder()), "0.classifier") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace_classifier(nn.Sequential(TwoBranchDecoder()), ContextAwareClassifier, path="0.classifier",
                           absorb_dropout=False)  # fmt: skip
        replace_classifier(nn.Sequential(TwoBranchDecoder()), "proto", path="0.classifier")  # keeps it anyway


def test_a_dropout_feeding_the_classifier_alone_through_a_variable_is_absorbed():
    model = nn.Sequential(GuardedDecoder(aux=True))
    replace_classifier(model, ContextAwareClassifier, path="0.conv_seg")
    assert isinstance(model[0].dropout, nn.Identity) and model[0].conv_seg.dropout.p == 0.2
    shared = nn.Sequential(GuardedDecoderWithAux(aux=True))
    with pytest.warns(UserWarning, match=r"GuardedDecoderWithAux.aux_seg reads the output of self.dropout"):
        replace_classifier(shared, ContextAwareClassifier, path="0.conv_seg")
    assert isinstance(shared[0].dropout, nn.Dropout2d)


def test_a_dropout_registered_twice_or_before_a_custom_sequential_stays():
    model = TinyFCN()
    model.aux_classifier[3] = model.classifier[3]  # one module feeding both heads
    with pytest.warns(UserWarning, match=r"the same Dropout is registered at 2 paths"):
        replace_classifier(model, ContextAwareClassifier)
    assert isinstance(model.classifier[3], nn.Dropout)

    class Skip(nn.Sequential):  # its forward feeds the classifier with the dropout's input too
        def forward(self, x):
            return self[2](self[1](self[0](x)) + self[0](x))

    model = nn.Sequential(Skip(nn.Conv2d(3, 8, 1), nn.Dropout(0.1), nn.Conv2d(8, 4, 1)))
    with pytest.warns(UserWarning, match=r"Skip overrides nn.Sequential.forward"):
        replace_classifier(model, ContextAwareClassifier, path="0.2")
    assert isinstance(model[0][1], nn.Dropout)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
def test_an_optimizer_built_before_replace_classifier_is_caught_by_supervise(optimizer):
    def train(build_first: bool) -> nn.Module:
        torch.manual_seed(0)
        model = TinyFCN(aux=False)
        if build_first:
            opt = optimizer(model.parameters(), lr=0.01)  # holds the conv that replace_classifier swaps out
        replace_classifier(model, ContextAwareClassifier)
        if not build_first:
            opt = optimizer(model.parameters(), lr=0.01)
        images, target = torch.randn(2, 3, 16, 16), torch.randint(0, 4, (2, 16, 16))
        for _ in range(3):
            opt.zero_grad()
            with supervise(model, target) as sup:
                loss = torch.nn.functional.cross_entropy(model(images)["out"], target) + sup.loss()
            loss.backward()
            opt.step()
        return model

    with pytest.warns(UserWarning, match=r"head at 'classifier.4' stayed unchanged over 2 optimizer steps .* after "):
        train(build_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(build_first=False)


# ----------------------------------------------------------------------------- which head is the main one
def test_every_replaced_path_is_kept_main_first():
    model = TinyFCN()
    replace_classifier(model, ContextAwareClassifier)
    replace_classifier(model, ContextAwareClassifier, path="aux_classifier.4")
    assert model.adaptive_head_paths == ["classifier.4", "aux_classifier.4"]
    assert model.adaptive_head_weights == {"aux_classifier.4": 0.5}  # torchvision's recipe
    model = TinyFCN()  # the other order
    replace_classifier(model, ContextAwareClassifier, path="aux_classifier.4")
    replace_classifier(model, ContextAwareClassifier)
    assert model.adaptive_head_paths == ["classifier.4", "aux_classifier.4"]


def test_image_context_uses_the_main_head_after_separate_replacements():
    torch.manual_seed(0)
    model = TinyFCN()
    replace_classifier(model, ContextAwareClassifier)
    replace_classifier(model, ContextAwareClassifier, path="aux_classifier.4")
    model.eval()
    images = torch.randn(1, 3, 32, 32)

    with torch.no_grad():
        out = model(images)
        ours = slide_inference(model, images, crop_size=32, stride=32, context="image")
    torch.testing.assert_close(ours, out["out"], rtol=1e-5, atol=1e-5)
    assert (ours - out["aux"]).abs().max() > 1e-3


def test_known_model_is_found_inside_a_wrapper_and_as_a_subclass():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.criterion = nn.CrossEntropyLoss()
            self.net = TinyFCN()

    assert find_classifier(Wrapper(), include_aux=True) == ["net.classifier.4", "net.aux_classifier.4"]

    class MyFCN(TinyFCN):
        pass

    assert find_classifier(MyFCN()) == ["classifier.4"]

    class Ensemble(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = TinyFCN(), TinyFCN()

    with pytest.raises(ValueError, match=r"several segmentation models: 'a' \(FCN\), 'b' \(FCN\); pass path="):
        find_classifier(Ensemble())


def test_unknown_model_with_several_candidate_convs_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError, match=r"2 convs with out_channels=4 .*\['0', '2'\]; pass path="):
        replace_classifier(model, ContextAwareClassifier, num_classes=4)
    replace_classifier(model, ContextAwareClassifier, path="2")
    with pytest.raises(ValueError, match=r"\['0', '2'\]"):  # the head's own coarse conv '2.conv_seg' is none
        find_classifier(model, num_classes=4)


# ----------------------------------------------------------------------------- auxiliary heads' weight
def test_supervise_weighs_an_auxiliary_head_as_the_host_library():
    torch.manual_seed(0)
    model = TinyFCN()
    replace_classifier(model, ContextAwareClassifier, include_aux=True)
    images, target = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    model.eval()  # no dropout: the same terms at every call
    for head in (model.classifier[4], model.aux_classifier[4]):
        head.take_input_dropout(0.0)
        head.train()
    with supervise(model, target) as sup:
        model(images)
    terms = sup.losses()
    extra = ("ce_coarse", "ce_teacher", "distill")
    main = sum(terms[f"classifier.4.{k}"] for k in extra)
    aux = sum(terms[f"aux_classifier.4.{k}"] for k in extra)
    torch.testing.assert_close(terms["adaptive_loss"], main + 0.5 * aux)
    assert sup.head_weights == {"classifier.4": 1.0, "aux_classifier.4": 0.5}
    with supervise(model, target, head_weights={"aux_classifier.4": 0.0}) as sup:
        model(images)
    torch.testing.assert_close(sup.loss(), main)
    with pytest.raises(ValueError, match="head_weights names unknown heads"):
        supervise(model, target, head_weights={"nope": 1.0})


# ----------------------------------------------------------------------------- class counts, ignore_index
@pytest.mark.parametrize("name", list(HEADS))
def test_one_class_is_refused_with_what_to_do(name):
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 2, got 1 .*use 2 classes and cross-entropy"):
        HEADS[name](8, 1)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 1, 1))
    with pytest.raises(ValueError, match=r"'1' has out_channels=1.*2 classes and train it with cross-entropy"):
        replace_classifier(model, HEADS[name], path="1")


def test_ignore_index_inside_the_classes_warns():
    with pytest.warns(UserWarning, match=r"ignore_index=255 is one of the 256 classes.*outside \[0, 256\)"):
        ContextAwareClassifier(8, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ContextAwareClassifier(8, 255)
        ContextAwareClassifier(8, 256, ignore_index=-1)


# ----------------------------------------------------------------------------- SSA's tile statistics
def test_ssa_tile_statistics_ignore_weight_zero_pixels_for_the_peak():
    torch.manual_seed(0)
    head = SSAClassifier(8, 3).eval()
    feat = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        head.conv_seg.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        head.conv_seg.weight.zero_()
        head.conv_seg.weight[:, 0] = 1.0  # coarse logits = channel 0 of the features, for every class
        centre = head.get_feat_pos.weight[..., 1, 1].clone()
        head.get_feat_pos.weight.zero_()
        head.get_feat_pos.weight[..., 1, 1] = centre  # pixel-local position features
    first, second = feat.clone(), feat.clone()
    first[:, 0, 0, 0] = 200.0  # the peak of the first tile, at a weight-0 pixel
    weight = torch.ones(1, 1, 6, 6)
    weight[..., 0, 0] = 0
    with torch.no_grad():
        merged = head.merge_context(head.context_statistics(first, weight), head.context_statistics(second, weight))
        logits = head.logits_from_context(feat, merged)
        alone = head.context_statistics(second, weight)  # the same counted pixels as the first tile's
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(
        merged["pos_sums"] / merged["pos_norm"].unsqueeze(-1), alone["pos_sums"] / alone["pos_norm"].unsqueeze(-1)
    )


# ----------------------------------------------------------------------------- bad labels on an accelerator
def test_labels_are_asserted_on_the_device_without_a_host_read(monkeypatch):
    monkeypatch.setattr(validation, "_value_checks", lambda t: False)  # an accelerator without debug mode
    head = ContextAwareClassifier(8, 4).to("meta")
    feat = torch.randn(2, 8, 4, 4, device="meta")
    target = torch.zeros(2, 16, 16, dtype=torch.long, device="meta")
    mode = DeviceDiscipline()
    with mode:  # no host read, and the assertion is issued on the device
        head(feat, target)
    assert "_assert_async" in mode.ops


def test_device_assertion_names_the_range_and_the_ignore_index_option(monkeypatch):
    monkeypatch.setattr(validation, "_value_checks", lambda t: False)
    monkeypatch.setattr(validation, "_device_checks", lambda t: True)  # the device path, run on the CPU
    head = ContextAwareClassifier(8, 4)
    target = torch.full((2, 16, 16), -100)
    with pytest.raises(RuntimeError, match=r"labels outside \[0, 4\) that are not ignore_index=255.*-100"):
        head(torch.randn(2, 8, 4, 4), target)
    head = ContextAwareClassifier(8, 4, ignore_index=-100)
    loss = head.default_loss()
    out = head(torch.randn(2, 8, 4, 4), target)
    assert torch.isfinite(loss(out, target)["loss"])


def test_cpu_labels_are_read_at_once_with_the_bad_values():
    head = ContextAwareClassifier(8, 4)
    with pytest.raises(ValueError, match=r"ignore_index=255; if your ignore value.*\(min -1, max -1\)"):
        head(torch.randn(1, 8, 4, 4), torch.full((1, 8, 8), -1))


# ----------------------------------------------------------------------------- gradients for DDP (docs/multi-gpu.md)
@pytest.mark.parametrize(
    "name,zero,starved",
    [
        ("cac", (), set()),
        ("ssa", (), set()),
        ("proto", (), set()),
        ("cac", ("ce_teacher",), set()),  # apd_proj: a gradient of zeros (batched with proj)
        ("ssa", ("ce_teacher", "dice_teacher"), set()),  # the gt_* layers: zeros (batched with the student's)
        ("ssa", ("ce_teacher",), set()),
        ("proto", ("ce",), {"mask_norm"}),
    ],
)
def test_layers_without_a_gradient_are_those_the_docs_name(name, zero, starved):
    torch.manual_seed(0)
    head = HEADS[name](8, 4)
    loss_fn = head.loss_type(weights=dict.fromkeys(zero, 0.0))
    target = torch.randint(0, 4, (2, 12, 12))
    loss_fn(head(torch.randn(2, 8, 6, 6), target), target)["loss"].backward()
    assert {n.split(".")[0] for n, p in head.named_parameters() if p.grad is None} == starved
    if (name, zero) in (("cac", ("ce_teacher",)), ("ssa", ("ce_teacher", "dice_teacher"))):  # no teacher signal
        teacher = [p for n, p in head.named_parameters() if n.startswith(("apd_proj", "gt_"))]
        assert all(p.grad is not None and not p.grad.any() for p in teacher)


# ----------------------------------------------------------------------------- review findings
def test_a_known_model_beside_other_candidate_convs_is_refused():
    class Distillation(nn.Module):  # a student of its own beside a torchvision-style teacher
        def __init__(self) -> None:
            super().__init__()
            self.student = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
            self.teacher = TinyFCN()

    with pytest.raises(ValueError, match=r"known segmentation model at 'teacher'.*\['student\.2'\]; pass path="):
        find_classifier(Distillation())


def test_image_context_refuses_a_model_whose_main_classifier_is_not_adaptive():
    model = TinyFCN()
    replace_classifier(model, ContextAwareClassifier, path="aux_classifier.4")
    assert model.adaptive_main_head is None and model.adaptive_head_paths == ["aux_classifier.4"]
    with pytest.raises(ValueError, match="main classifier is not an adaptive head"):
        slide_inference(model.eval(), torch.randn(1, 3, 16, 16), crop_size=16, stride=16, context="image")
    replace_classifier(model, ContextAwareClassifier)
    assert model.adaptive_main_head == "classifier.4"
    assert model.adaptive_head_paths == ["classifier.4", "aux_classifier.4"]


def test_init_weights_called_by_a_subclass_constructor_draws_once_more():
    class Reinitialised(ContextAwareClassifier):  # the mmcv pattern: init_weights() at the end of __init__
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.init_weights()

    torch.manual_seed(0)
    head = Reinitialised(8, 3)
    torch.manual_seed(0)
    expected = ContextAwareClassifier(8, 3)
    expected.reset_parameters()
    _assert_same_state(head, expected)
