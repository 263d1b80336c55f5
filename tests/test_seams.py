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
    check_optimizer,
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
    del old.__dict__["_default_dropout"]  # as 0.2.0 pickled: its construction record, the names of the options given
    old.__dict__["_construction"] = (torch.random.get_rng_state(), (8, 3), {"dropout": 0.2})
    old.__dict__["_explicit_options"] = ("dropout",)
    clone = pickle.loads(pickle.dumps(old))
    assert not {"_construction", "_explicit_options"} & set(clone.__dict__)
    assert clone.dropout.p == 0.2 and clone._default_dropout is False  # keeps its rate
    torch.testing.assert_close(clone.eval()(torch.ones(1, 8, 4, 4)), head.eval()(torch.ones(1, 8, 4, 4)))


# ----------------------------------------------------------------------------- the host's dropout
AUX_DROPOUTS = {"classifier.4": "classifier.3", "aux_classifier.4": "aux_classifier.3"}


@pytest.mark.parametrize("name", ["cac", "ssa"])
def test_a_named_host_dropout_moves_to_the_coarse_path(name, caplog):
    torch.manual_seed(0)
    model = TinyFCN(width=32)  # 64 channel draws per call: two equal Dropout2d(0.1) masks have odds 1e-6
    model.classifier[3] = nn.Dropout(0.3)
    with caplog.at_level(logging.INFO, logger="adaptive_heads.replace"):
        replace_classifier(model, HEADS[name], include_aux=True, absorb_dropout=AUX_DROPOUTS)
    assert isinstance(model.classifier[3], nn.Identity) and isinstance(model.aux_classifier[3], nn.Identity)
    main, aux = model.classifier[4], model.aux_classifier[4]
    assert main.dropout.p == 0.3 and aux.dropout.p == 0.1 and main.options()["dropout"] == 0.3
    assert "'classifier.3'" in caplog.text and "absorb_dropout=False" in caplog.text
    images, target = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    assert_dropout_on_the_coarse_path_only(model, lambda: model(images), target, ["classifier.4", "aux_classifier.4"])


def unknown_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(8, 4, 1))


def test_an_unknown_models_dropout_stays_with_a_warning_naming_the_argument():
    """Only a known model's dropout moves by itself (TinyFCN is torchvision's FCN by module name; the real ones:
    tests/integrations)."""
    model = unknown_model()
    with pytest.warns(UserWarning, match=r"'2' .* sits right before the classifier at '3'.* absorb_dropout='2'"):
        replace_classifier(model, ContextAwareClassifier, num_classes=4)
    assert isinstance(model[2], nn.Dropout) and model[3].dropout.p == 0.1  # its own default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace_classifier(unknown_model(), ContextAwareClassifier, num_classes=4, absorb_dropout=False)
        replace_classifier(unknown_model(), HEADS["proto"], num_classes=4)  # ProtoSeg embeds dropped-out features
    model = unknown_model()
    replace_classifier(model, ContextAwareClassifier, num_classes=4, absorb_dropout="2")
    assert isinstance(model[2], nn.Identity) and model[3].dropout.p == 0.1
    model = TinyFCN()  # a known model: torchvision's FCN heads' dropout moves by itself, main and auxiliary
    replace_classifier(model, ContextAwareClassifier, include_aux=True)
    assert isinstance(model.classifier[3], nn.Identity) and isinstance(model.aux_classifier[3], nn.Identity)


def test_a_head_built_with_a_dropout_rate_keeps_it():
    model = TinyFCN()
    replace_classifier(model, functools.partial(ContextAwareClassifier, dropout=0.0), absorb_dropout="classifier.3")
    assert isinstance(model.classifier[3], nn.Identity) and isinstance(model.classifier[4].dropout, nn.Identity)
    model = TinyFCN()
    replace_classifier(model, functools.partial(ContextAwareClassifier, dropout=0.2), absorb_dropout="classifier.3")
    assert model.classifier[4].dropout.p == 0.2


def test_protoseg_keeps_the_host_dropout_even_when_named():
    model = TinyFCN()
    replace_classifier(model, HEADS["proto"], absorb_dropout="classifier.3")
    assert isinstance(model.classifier[3], nn.Dropout)


def test_absorb_dropout_arguments_are_checked():
    with pytest.raises(ValueError, match=r"absorb_dropout: 'classifier.2' is a ReLU, expected the dropout"):
        replace_classifier(TinyFCN(), ContextAwareClassifier, absorb_dropout="classifier.2")
    with pytest.raises(ValueError, match=r"names one dropout but 2 classifiers are replaced"):
        replace_classifier(TinyFCN(), ContextAwareClassifier, include_aux=True, absorb_dropout="classifier.3")
    with pytest.raises(ValueError, match=r"names classifiers \['head'\] that are not replaced"):
        replace_classifier(TinyFCN(), ContextAwareClassifier, absorb_dropout={"head": "classifier.3"})
    with pytest.raises(TypeError, match=r"absorb_dropout must be True, False, a dropout's path or a mapping"):
        replace_classifier(TinyFCN(), ContextAwareClassifier, absorb_dropout=1)
    model = TinyFCN()
    model.aux_classifier[3] = model.classifier[3]  # one module feeding both heads
    with pytest.raises(ValueError, match=r"registered at 2 paths"):
        replace_classifier(model, ContextAwareClassifier, absorb_dropout="classifier.3")


class LoopDecoder(nn.Module):
    """A refinement loop: the classifier reads this iteration's dropout output, the next iteration's fuse reads it
    again (the case a source reading took for "feeds the classifier alone")."""

    def __init__(self) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(8, 8, 1)
        self.dropout = nn.Dropout2d(0.5)
        self.classifier = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        logits = []
        for _ in range(2):
            x = self.dropout(self.fuse(x))
            logits.append(self.classifier(x))
        return sum(logits)


class InPlaceDecoder(nn.Module):
    """An in-place dropout in an ``nn.Sequential`` whose input also feeds another layer, read after it: that layer
    sees the dropped-out features (the case the ``nn.Sequential`` layout took for "feeds the classifier alone")."""

    def __init__(self) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(3, 8, 1)
        self.head = nn.Sequential(nn.Dropout2d(0.5, inplace=True), nn.Conv2d(8, 4, 1))
        self.edge = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        feat = self.fuse(x)
        return self.head(feat), self.edge(feat)


@pytest.mark.parametrize(
    ("model", "path", "dropout", "other"),
    [(LoopDecoder, "classifier", "dropout", "fuse"), (InPlaceDecoder, "head.1", "head.0", "edge")],
    ids=["loop", "in-place"],
)
def test_a_dropout_that_also_feeds_another_layer_is_not_moved(model, path, dropout, other):
    """Removing the dropout would change what ``other`` computes in training: the default leaves it (with the
    warning), and the other layer's input stays what the model computed."""
    net = model()
    images = torch.randn(2, 8 if model is LoopDecoder else 3, 8, 8)
    with pytest.warns(UserWarning, match=rf"{dropout!r} .* sits right before the classifier at {path!r}"):
        replace_classifier(net, ContextAwareClassifier, path=path)
    assert isinstance(net.get_submodule(dropout), nn.Dropout2d)
    seen: list[torch.Tensor] = []
    net.get_submodule(other).register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    net.train()
    torch.manual_seed(0)
    with supervise(net, torch.randint(0, 4, (2, 8, 8))):
        net(images)
    assert any(bool((x.abs().sum(dim=(2, 3)) == 0).any()) for x in seen)  # dropped-out channels reach it


# ----------------------------------------------------------------------------- the optimizer holds the heads
@pytest.mark.parametrize(
    "optimizer",
    [
        functools.partial(torch.optim.SGD, lr=0.01),
        functools.partial(torch.optim.AdamW, lr=0.01, foreach=True),
        functools.partial(torch.optim.AdamW, lr=0.01, fused=True),  # HF Trainer's default on torch >= 2.8
    ],
    ids=["sgd", "adamw-foreach", "adamw-fused"],
)
def test_an_optimizer_built_before_replace_classifier_is_refused_by_supervise(optimizer):
    torch.manual_seed(0)
    model = TinyFCN(aux=False)
    early = optimizer(model.parameters())  # holds the conv that replace_classifier swaps out
    replace_classifier(model, ContextAwareClassifier, absorb_dropout=False)
    images, target = torch.randn(2, 3, 16, 16), torch.randint(0, 4, (2, 16, 16))
    trainable = sum(p.requires_grad for p in model.classifier[4].parameters())
    with pytest.raises(ValueError, match=rf"adaptive head\(s\) \['classifier.4' \(0 of {trainable}\)\]"):
        with supervise(model, target, optimizer=early):
            pass
    late = optimizer(model.parameters())
    with supervise(model, target, optimizer=late) as sup:
        loss = torch.nn.functional.cross_entropy(model(images)["out"], target) + sup.loss()
    loss.backward()
    late.step()


def test_check_optimizer_counts_param_groups_and_skips_frozen_parameters():
    model = TinyFCN(aux=False)
    replace_classifier(model, ContextAwareClassifier, absorb_dropout=False)
    head = model.classifier[4]
    backbone = [p for n, p in model.named_parameters() if not n.startswith("classifier.4.")]
    opt = torch.optim.SGD([{"params": backbone}, {"params": head.conv_seg.parameters(), "lr": 0.1}], lr=0.01)
    total = sum(1 for _ in head.parameters())
    with pytest.raises(ValueError, match=rf"'classifier.4' \(2 of {total}\)"):
        check_optimizer(model, opt)
    opt.add_param_group({"params": [p for n, p in head.named_parameters() if not n.startswith("conv_seg.")]})
    check_optimizer(model, opt)
    for p in head.proj.parameters():
        p.requires_grad_(False)  # frozen: need not be held
    check_optimizer(model, torch.optim.SGD([*backbone, *(p for p in head.parameters() if p.requires_grad)], lr=0.1))
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer"):
        check_optimizer(model, [torch.zeros(1)])
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer or several, got int"):
        check_optimizer(model, 3)


def test_check_optimizer_takes_several_optimizers_and_layer_wise_ones():
    model = TinyFCN(aux=False)
    replace_classifier(model, ContextAwareClassifier, absorb_dropout=False)
    head = list(model.classifier[4].parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("classifier.4.")]
    check_optimizer(model, [torch.optim.SGD(rest, lr=0.1), torch.optim.AdamW(head, lr=0.01)])
    with pytest.raises(ValueError, match=r"'classifier.4' \(0 of"):
        check_optimizer(model, [torch.optim.SGD(rest, lr=0.1)])

    class LayerWise(torch.optim.Optimizer):  # HF's LayerWiseDummyOptimizer: one optimizer per parameter
        def __init__(self, params):
            self.optimizer_dict = {p: torch.optim.SGD([p], lr=0.1) for p in params}
            super().__init__([torch.zeros(())], {"lr": 0.0})  # a placeholder group

    check_optimizer(model, LayerWise(list(model.parameters())))
    with pytest.raises(ValueError, match=r"'classifier.4'"):
        check_optimizer(model, LayerWise(rest))


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
