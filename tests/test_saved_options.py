"""A head's class and options travel in its state dict: a load into a head built differently is refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from adaptive_heads import ContextAwareClassifier, PrototypeClassifier, SSAClassifier
from adaptive_heads.registry import HEADS

#: per head, an option that changes what the weights compute, a training-only one, and one without effect
FUNCTION_OPTION = {"cac": ("tau", 10.0), "ssa": ("eps", 1e-6), "proto": ("projection_norm", "width")}
TRAINING_OPTION = {"cac": ("dropout", 0.3), "ssa": ("teacher_pooling", "image"), "proto": ("gamma", 0.9)}
FREE_OPTION = {"cac": ("init_std", 0.5), "ssa": ("init_std", 0.5), "proto": ("checkpoint_embedding", True)}


def _pair(name, **saved_options):
    torch.manual_seed(0)
    saved = HEADS[name](8, 3, **saved_options)
    torch.manual_seed(1)
    return saved, HEADS[name](8, 3)


@pytest.mark.parametrize("name", list(HEADS))
def test_a_function_option_that_differs_is_an_error_and_no_head_weight_is_copied(name):
    """Reported as PyTorch reports a size mismatch: the rest of the model loads, the head keeps its weights, and
    load_state_dict raises after the walk, naming the option and both values."""
    option, value = FUNCTION_OPTION[name]
    saved_head, head = _pair(name, **{option: value})
    saved = nn.Sequential(nn.Conv2d(3, 8, 1), saved_head)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), head)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf"1: .*built with {option}={value!r} \(this head: .*\).* Build the head"):
        model.load_state_dict(saved.state_dict(), strict=False)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # none of the head's weights
    assert torch.equal(model[0].weight, saved[0].weight)  # the rest loads, as with a size mismatch
    with pytest.raises(ValueError, match=f"built with {option}="):  # loaders that call set_extra_state directly
        head.set_extra_state(saved_head.get_extra_state())


def test_the_logits_a_wrong_load_would_have_given_differ():
    """Why it is refused: CAC weights trained with tau=10 give other logits in a tau=15 head."""
    saved, other = _pair("cac", tau=10.0)
    weights = {k: v for k, v in saved.state_dict().items() if k != "_extra_state"}
    other.load_state_dict(weights, strict=False)  # the old behaviour: no options saved, nothing checked
    feat = torch.randn(2, 8, 5, 6)
    assert (saved.eval()(feat) - other.eval()(feat)).abs().max() > 0.1


@pytest.mark.parametrize("name", list(HEADS))
def test_a_training_option_that_differs_loads_with_a_warning_naming_it(name):
    option, value = TRAINING_OPTION[name]
    saved, other = _pair(name, **{option: value})
    with pytest.warns(UserWarning, match=rf"trained with {option}={value!r} \(kept: ") as record:
        other.load_state_dict(saved.state_dict())
    assert record[0].filename == __file__  # points at the user's load, not into torch
    kept = other.options()[option]
    assert kept != value  # the head keeps its own value
    feat = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(other.eval()(feat), saved.eval()(feat))


@pytest.mark.parametrize("name", list(HEADS))
def test_options_without_effect_on_the_numbers_are_not_compared(name):
    option, value = FREE_OPTION[name]
    saved, other = _pair(name, **{option: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(saved.state_dict())


def test_another_head_class_or_shape_is_refused_with_the_module_path():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ContextAwareClassifier(8, 3))
    with pytest.raises(RuntimeError, match=r"1: the checkpoint holds a ContextAwareClassifier's weights, this is a "
                       "SSAClassifier"):  # fmt: skip
        nn.Sequential(nn.Conv2d(3, 8, 1), SSAClassifier(8, 3)).load_state_dict(model.state_dict())
    saved = PrototypeClassifier(8, 3, num_prototypes=4).state_dict()
    with pytest.raises(RuntimeError, match=r"num_prototypes=4 \(this head: 10\)"):
        PrototypeClassifier(8, 3).load_state_dict(saved)


def test_a_subclass_loads_its_library_heads_checkpoint():
    class MyHead(ContextAwareClassifier):
        pass

    MyHead(8, 3).load_state_dict(ContextAwareClassifier(8, 3).state_dict())


def test_the_options_are_one_uint8_tensor_that_safetensors_keeps(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    head = SSAClassifier(8, 3, tau=12.0)
    state = head.state_dict()
    assert state["_extra_state"].dtype == torch.uint8 and state["_extra_state"].shape == (1024,)
    safetensors.save_file(state, tmp_path / "head.safetensors")
    loaded = safetensors.load_file(tmp_path / "head.safetensors")
    SSAClassifier(8, 3, tau=12.0).load_state_dict(loaded)
    with pytest.raises(RuntimeError, match=r"tau=12\.0"):
        SSAClassifier(8, 3).load_state_dict(loaded)


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
    with pytest.raises(RuntimeError, match=r"tau=10\.0"):
        ContextAwareClassifier(8, 3).load_state_dict(state)


def test_mmengine_strict_false_logs_the_mismatch_as_for_a_size_mismatch():
    mmengine_checkpoint = pytest.importorskip("mmengine.runner.checkpoint")
    saved = nn.Sequential(nn.Conv2d(3, 8, 1), ContextAwareClassifier(8, 3, tau=10.0)).state_dict()
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ContextAwareClassifier(8, 3))
    before = model[1].proj[0].weight.clone()
    mmengine_checkpoint.load_state_dict(model, saved, strict=False)  # mmseg's load_from: warns, does not raise
    assert torch.equal(model[1].proj[0].weight, before) and torch.equal(model[0].weight, saved["0.weight"])
    with pytest.raises(RuntimeError, match=r"tau=10\.0"):
        mmengine_checkpoint.load_state_dict(model, saved, strict=True)


def test_a_state_dict_without_options_loads_when_not_strict():
    """Weights filtered by hand (or saved before 0.2): no options to compare; strict loading names the key."""
    weights = {k: v for k, v in ContextAwareClassifier(8, 3).state_dict().items() if k != "_extra_state"}
    ContextAwareClassifier(8, 3).load_state_dict(weights, strict=False)
    with pytest.raises(RuntimeError, match="_extra_state"):
        ContextAwareClassifier(8, 3).load_state_dict(weights)


@pytest.mark.parametrize("name", ["cac", "ssa"])
def test_a_checkpoint_from_before_replace_classifier_gives_its_conv_to_the_coarse_classifier(name):
    """Saved before the swap, loaded after: the conv's weights become conv_seg's (what replace_classifier copies),
    the adaptive layers are reported missing."""
    from adaptive_heads import replace_classifier

    trained = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    saved = {k: v.clone() for k, v in trained.state_dict().items()}
    model = replace_classifier(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)), name, path="2")
    missing, unexpected = model.load_state_dict(saved, strict=False)
    assert unexpected == [] and "2._extra_state" in missing and not any("conv_seg" in k for k in missing)
    assert torch.equal(model[2].conv_seg.weight, saved["2.weight"])
    assert torch.equal(model[2].conv_seg.bias, saved["2.bias"])
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(model[2].eval().coarse_logits(model[1](model[0](x))), trained(x))
