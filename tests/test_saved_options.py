"""A head's class and options travel in its state dict: optional, versioned, checked after every tensor that fits
has loaded (docs/checkpoints.md). Through torch's own ``load_state_dict``."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from adaptive_heads import ContextAwareClassifier, PrototypeClassifier, SSAClassifier, check_state_dict
from adaptive_heads.registry import HEADS

#: per head, an option that changes what the weights compute, one that changes how it trains (both compared), and
#: one without effect on the numbers (not compared)
FUNCTION_OPTION = {"cac": ("tau", 10.0), "ssa": ("eps", 1e-6), "proto": ("projection_norm", "width")}
TRAINING_OPTION = {"cac": ("dropout", 0.3), "ssa": ("teacher_pooling", "image"), "proto": ("gamma", 0.9)}
FREE_OPTION = {"cac": ("init_std", 0.5), "ssa": ("init_std", 0.5), "proto": ("checkpoint_embedding", True)}


def _pair(name, num_classes=3, saved_classes=3, **saved_options):
    torch.manual_seed(0)
    saved = HEADS[name](8, saved_classes, **saved_options)
    torch.manual_seed(1)
    return saved, HEADS[name](8, num_classes)


def _model(head):
    return nn.Sequential(nn.Conv2d(3, 8, 1), head)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_fitting_tensors_loaded(head, saved, before):
    """Every tensor of ``head`` whose shape matches ``saved``'s holds the saved value; the others kept theirs."""
    fitted = 0
    for key, value in head.state_dict().items():
        if key == "_extra_state":  # the head's own options, not a weight
            continue
        if key in saved and saved[key].shape == value.shape:
            assert torch.equal(value, saved[key]), f"{key} fits but was not loaded"
            fitted += 1
        else:
            assert torch.equal(value, before[key]), f"{key} does not fit but changed"
    assert fitted > 1


# ----------------------------------------------------------------------------- 1. fine-tuning onto another class count
@pytest.mark.parametrize("name", list(HEADS))
def test_the_shape_filter_recipe_loads_every_head_tensor_that_fits_without_a_word(name):
    """PyTorch's fine-tuning recipe: keep the keys whose shapes fit, load_state_dict(filtered, strict=False)."""
    saved_head, head = _pair(name, num_classes=7, saved_classes=5)
    saved = _model(saved_head).state_dict()
    model = _model(head)
    before = {k[2:]: v for k, v in _snapshot(model).items() if k.startswith("1.")}
    own = model.state_dict()
    filtered = {k: v for k, v in saved.items() if k in own and v.shape == own[k].shape}
    assert "1._extra_state" in filtered  # one length for every head: it survives the filter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        missing, unexpected = model.load_state_dict(filtered, strict=False)
    assert unexpected == [] and "1._extra_state" not in missing
    assert set(missing) == {k for k in own if k not in filtered}  # exactly what the class count changes
    _assert_fitting_tensors_loaded(head, {k[2:]: v for k, v in saved.items()}, before)


def test_an_unfiltered_load_reports_only_torchs_own_size_mismatches():
    saved_head, head = _pair("cac", num_classes=7, saved_classes=5)
    with pytest.raises(RuntimeError) as raised:
        _model(head).load_state_dict(_model(saved_head).state_dict(), strict=False)
    message = str(raised.value)
    assert "size mismatch for 1.conv_seg.weight" in message
    assert "num_classes" not in message and "Build the head" not in message  # no advice against fine-tuning


# ----------------------------------------------------------------------------- 2. the entry is optional
@pytest.mark.parametrize("name", list(HEADS))
def test_a_state_dict_without_the_entry_loads_strictly_with_a_warning(name):
    """Saved by 0.1, or filtered to parameters by a tool or by hand."""
    saved_head, head = _pair(name)
    weights = {k: v for k, v in _model(saved_head).state_dict().items() if not k.endswith("_extra_state")}
    model = _model(head)
    with pytest.warns(UserWarning, match=r"1: the state dict has no saved options .*could not be checked") as record:
        assert model.load_state_dict(weights) is not None  # strict=True
    assert record[0].filename == __file__  # points at the user's load
    for key, value in weights.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_whole_model_state_dict_without_the_head_says_nothing_of_options():
    """No head weight in the state dict: its keys are missing (torch says so), there are no options to check."""
    backbone = {k: v for k, v in _model(ContextAwareClassifier(8, 3)).state_dict().items() if k.startswith("0.")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        missing, _ = _model(ContextAwareClassifier(8, 3)).load_state_dict(backbone, strict=False)
    assert "1.proj.0.weight" in missing and "1._extra_state" not in missing


# ----------------------------------------------------------------------------- 3. numpy option values
def test_numpy_option_values_are_plain_python_values_and_the_state_dict_saves():
    head = PrototypeClassifier(
        np.int64(8), np.int64(3), num_prototypes=np.int64(3), gamma=np.float64(0.9), sinkhorn_iters=np.int32(2),
        sinkhorn_eps=np.float32(0.5), update_prototypes=np.bool_(False), projection_norm=np.str_("width"),
        ignore_index=np.int64(-1),
    )  # fmt: skip
    options = head.options()
    assert {type(v) for v in options.values()} <= {int, float, bool, str}
    assert options["num_prototypes"] == 3 and options["update_prototypes"] is False and head.in_channels == 8
    state = head.state_dict()  # was a TypeError from json
    same = dict(gamma=0.9, sinkhorn_iters=2, sinkhorn_eps=0.5, update_prototypes=False, projection_norm="width")
    PrototypeClassifier(8, 3, num_prototypes=3, ignore_index=-1, **same).load_state_dict(state)
    cac = ContextAwareClassifier(8, 3, tau=np.float32(10), kernel_size=np.int64(3), dropout=np.float32(0.25))
    assert cac.options()["kernel_size"] == 3 and type(cac.options()["tau"]) is float
    ContextAwareClassifier(8, 3, tau=10.0, kernel_size=3, dropout=0.25).load_state_dict(cac.state_dict())
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        ContextAwareClassifier(np.float64(8.0), 3)  # a float is still refused


# ----------------------------------------------------------------------------- 4. a versioned record
def _record_bytes(head, **changes):
    record = json.loads(bytes(head.state_dict()["_extra_state"].tolist()).rstrip(b"\0"))
    record.update(changes)
    return torch.tensor(list(json.dumps(record).encode().ljust(1024, b"\0")), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            lambda h: _record_bytes(h, format=2),
            r"format 2, written by a newer adaptive_heads; this version reads "
            r"format 1: upgrade adaptive_heads, or the weights load without it .*deleting '1\._extra_state'",
        ),
        (
            lambda h: torch.full((1024,), 255, dtype=torch.uint8),
            r"1\._extra_state: .*not the JSON record .*format "
            r"unknown.*deleting '1\._extra_state'",
        ),
        (lambda h: _record_bytes(h, format=None), r"1\._extra_state: .*incomplete record \(format None"),
        (lambda h: torch.zeros(3, 4), r"1\._extra_state: .*not a 1-D tensor of bytes \(got \(3, 4\)"),
    ],
    ids=["newer", "corrupt", "no-format", "not-bytes"],
)
def test_an_unreadable_record_is_a_warning_naming_the_key_the_format_and_the_way_out(entry, message):
    """The weights load (also strictly), with a warning naming the key, the format and what to do;
    check_state_dict raises with the same words."""
    saved_head, head = _pair("cac")
    state = _model(saved_head).state_dict()
    state["1._extra_state"] = entry(saved_head)
    model = _model(head)
    with pytest.warns(UserWarning, match=message):
        assert model.load_state_dict(state) is not None  # strict=True
    assert torch.equal(model[1].proj[0].weight, saved_head.proj[0].weight)
    with pytest.raises(ValueError, match=message):
        check_state_dict(_model(head), state)
    with pytest.warns(UserWarning, match="_extra_state"):  # loaders that call set_extra_state directly
        head.set_extra_state(entry(saved_head))


# ----------------------------------------------------------------------------- options that differ
@pytest.mark.parametrize("kind", ["function", "training"])
@pytest.mark.parametrize("name", list(HEADS))
def test_an_option_that_differs_loads_every_weight_with_a_warning_and_check_state_dict_refuses_it(name, kind):
    """A warning naming the option and both values, pointing at the user's load; the strict load succeeds and every
    tensor loads (the configuration that builds the head lives beside the weights: docs/checkpoints.md); the head
    keeps its own options. check_state_dict is the strict check, before anything is copied."""
    option, value = (FUNCTION_OPTION if kind == "function" else TRAINING_OPTION)[name]
    saved_head, head = _pair(name, **{option: value})
    saved = _model(saved_head).state_dict()
    model = _model(head)
    before = _snapshot(model)
    expected = rf"1: .*built with {option}={value!r} \(this head: .*\).* build the head with {option}={value!r}"
    with pytest.raises(ValueError, match=expected):
        check_state_dict(model, saved)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing copied
    with pytest.warns(UserWarning, match=expected + r"(.|\n)*Every tensor whose shape fits was loaded") as record:
        missing, unexpected = model.load_state_dict(saved)  # strict=True
    assert record[0].filename == __file__  # points at the user's load, not into torch
    assert missing == [] and unexpected == []
    for key, tensor in saved.items():
        if not key.endswith("_extra_state"):
            assert torch.equal(model.state_dict()[key], tensor), key
    assert model[1].options()[option] != value  # the head keeps its own options
    with pytest.warns(UserWarning, match=f"built with {option}="):  # loaders that call set_extra_state directly
        head.set_extra_state(saved_head.get_extra_state())
    check_state_dict(_model(type(saved_head)(8, 3, **{option: value})), saved)  # the same options: nothing


def test_another_head_class_loads_what_fits_with_a_warning():
    cac = _model(ContextAwareClassifier(8, 3)).state_dict()
    expected = r"1: the checkpoint holds a ContextAwareClassifier's weights, this is a SSAClassifier"
    with pytest.warns(UserWarning, match=expected), pytest.raises(RuntimeError, match=r"Missing key.*center_pos"):
        _model(SSAClassifier(8, 3)).load_state_dict(cac)  # torch's own report of the tensors SSA-Seg has more
    model = _model(SSAClassifier(8, 3))
    with pytest.warns(UserWarning, match=expected):
        model.load_state_dict(cac, strict=False)
    assert torch.equal(model[1].conv_seg.weight, cac["1.conv_seg.weight"])  # what both heads have
    with pytest.raises(ValueError, match=expected):
        check_state_dict(_model(SSAClassifier(8, 3)), cac)
    saved = PrototypeClassifier(8, 3, num_prototypes=4).state_dict()
    with pytest.warns(UserWarning, match=r"num_prototypes=4 \(this head: 10\)"), pytest.raises(RuntimeError):
        PrototypeClassifier(8, 3).load_state_dict(saved)


def test_check_state_dict_names_every_head_and_a_missing_record():
    model = nn.Sequential(ContextAwareClassifier(8, 3), SSAClassifier(8, 3))
    saved = nn.Sequential(ContextAwareClassifier(8, 3, tau=10.0), SSAClassifier(8, 3)).state_dict()
    del saved["1._extra_state"]
    with pytest.raises(ValueError, match=r"0: .*tau=10\.0 \(this head: 15\.0\).*; 1: no saved options \('1\._extra"):
        check_state_dict(model, saved)


def test_the_logits_a_wrong_load_would_have_given_differ():
    """Why an option is reported: CAC weights trained with tau=10 give other logits in a tau=15 head."""
    saved, other = _pair("cac", tau=10.0)
    with pytest.warns(UserWarning, match="tau=10.0"):
        other.load_state_dict(saved.state_dict())  # loaded, with the warning
    feat = torch.randn(2, 8, 5, 6)
    assert (saved.eval()(feat) - other.eval()(feat)).abs().max() > 0.1


@pytest.mark.parametrize("name", list(HEADS))
def test_options_without_effect_on_the_numbers_are_not_compared(name):
    option, value = FREE_OPTION[name]
    saved, other = _pair(name, **{option: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(saved.state_dict())


def test_a_subclass_loads_its_library_heads_checkpoint():
    class MyHead(ContextAwareClassifier):
        pass

    MyHead(8, 3).load_state_dict(ContextAwareClassifier(8, 3).state_dict())


# ----------------------------------------------------------------------------- the round trips of the entry
def test_the_options_are_one_uint8_tensor_that_safetensors_keeps(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    head = SSAClassifier(8, 3, tau=12.0)
    state = head.state_dict()
    assert state["_extra_state"].dtype == torch.uint8 and state["_extra_state"].shape == (1024,)
    safetensors.save_file(state, tmp_path / "head.safetensors")
    loaded = safetensors.load_file(tmp_path / "head.safetensors")
    SSAClassifier(8, 3, tau=12.0).load_state_dict(loaded)
    with pytest.raises(ValueError, match=r"tau=12\.0"):
        check_state_dict(SSAClassifier(8, 3), loaded)


def test_a_bare_state_dict_keeps_the_options_through_torch_save_weights_only(tmp_path):
    torch.save(ContextAwareClassifier(8, 3, tau=10.0).state_dict(), tmp_path / "head.pt")
    state = torch.load(tmp_path / "head.pt", weights_only=True)
    with pytest.raises(ValueError, match=r"tau=10\.0"):
        check_state_dict(ContextAwareClassifier(8, 3), state)


def test_one_length_for_every_head_on_the_cpu_even_under_a_meta_device():
    """Distributed checkpointing and shape filters compare shapes: every head's entry has the same one."""
    sizes = {HEADS[n](8, 3, **dict([FUNCTION_OPTION[n]])).state_dict()["_extra_state"].shape for n in HEADS}
    assert sizes == {(1024,)}
    with torch.device("meta"):
        head = ContextAwareClassifier(8, 3)
    assert head.get_extra_state().device.type == "cpu"


def test_a_state_dict_cast_to_half_still_loads():
    state = {k: v.half() for k, v in ContextAwareClassifier(8, 3, tau=10.0).state_dict().items()}
    ContextAwareClassifier(8, 3, tau=10.0).load_state_dict(state)
    check_state_dict(ContextAwareClassifier(8, 3, tau=10.0), state)
    with pytest.warns(UserWarning, match=r"tau=10\.0"):
        ContextAwareClassifier(8, 3).load_state_dict(state)


@pytest.mark.parametrize("name", ["cac", "ssa"])
def test_a_checkpoint_from_before_replace_classifier_gives_its_conv_to_the_coarse_classifier(name):
    """Saved before the swap, loaded after: the conv's weights become conv_seg's (what replace_classifier copies),
    the adaptive layers are reported missing."""
    from adaptive_heads import replace_classifier

    trained = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    saved = {k: v.clone() for k, v in trained.state_dict().items()}
    model = replace_classifier(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)), name, path="2")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        missing, unexpected = model.load_state_dict(saved, strict=False)
    assert not [w for w in record if "saved options" in str(w.message)]  # a plain model's conv holds no options
    assert unexpected == [] and "2._extra_state" not in missing and not any("conv_seg" in k for k in missing)
    assert any(k.startswith("2.") for k in missing)  # the adaptive layers
    assert torch.equal(model[2].conv_seg.weight, saved["2.weight"])
    assert torch.equal(model[2].conv_seg.bias, saved["2.bias"])
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(model[2].eval().coarse_logits(model[1](model[0](x))), trained(x))


# ----------------------------------------------------------------------------- 7. mmengine's load_checkpoint
def _mmengine_load(model, state, tmp_path, capsys, strict=False):
    """mmseg's ``load_from``: mmengine's load_checkpoint of a saved checkpoint file; its log (printed) text."""
    checkpoint = pytest.importorskip("mmengine.runner.checkpoint")
    torch.save({"state_dict": state, "meta": {}}, tmp_path / "saved.pth")
    capsys.readouterr()
    checkpoint.load_checkpoint(model, str(tmp_path / "saved.pth"), map_location="cpu", strict=strict)
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(HEADS))
def test_mmengine_load_checkpoint_fine_tunes_onto_another_class_count(name, tmp_path, capsys):
    """load_checkpoint(model_for_7_classes, checkpoint_for_5, strict=False): the backbone and every head tensor that
    fits load; the log lists the size mismatches, and no advice to build the head for 5 classes."""
    saved_head, head = _pair(name, num_classes=7, saved_classes=5)
    saved = _model(saved_head).state_dict()
    model = _model(head)
    before = {k[2:]: v for k, v in _snapshot(model).items() if k.startswith("1.")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch 2.4: torch.load FutureWarning
        log = _mmengine_load(model, saved, tmp_path, capsys)
    assert torch.equal(model[0].weight, saved["0.weight"])
    _assert_fitting_tensors_loaded(head, {k[2:]: v for k, v in saved.items()}, before)
    assert "size mismatch" in log and "num_classes" not in log and "_extra_state" not in log


@pytest.mark.parametrize("change", ["tau", "class"])
def test_mmengine_load_checkpoint_of_other_options_loads_what_fits_and_warns(change, tmp_path, capsys):
    saved_head = ContextAwareClassifier(8, 3, tau=10.0) if change == "tau" else ContextAwareClassifier(8, 3)
    head = ContextAwareClassifier(8, 3) if change == "tau" else SSAClassifier(8, 3)
    saved = _model(saved_head).state_dict()
    model = _model(head)
    expected = r"tau=10\.0 \(this head: 15\.0\)" if change == "tau" else "ContextAwareClassifier's weights"
    with pytest.warns(UserWarning, match=expected):
        log = _mmengine_load(model, saved, tmp_path, capsys)
    assert "_extra_state" not in log
    assert torch.equal(model[0].weight, saved["0.weight"])
    assert torch.equal(model[1].conv_seg.weight, saved["1.conv_seg.weight"])  # loaded: it fits
    if change == "tau":
        assert torch.equal(model[1].proj[0].weight, saved["1.proj.0.weight"])
        with pytest.warns(UserWarning, match=expected):  # strict: loads as well (the config builds the head)
            _mmengine_load(_model(type(head)(8, 3)), saved, tmp_path, capsys, strict=True)
    else:
        with pytest.warns(UserWarning, match=expected), pytest.raises(RuntimeError, match=r"center_pos"):
            _mmengine_load(_model(type(head)(8, 3)), saved, tmp_path, capsys, strict=True)
