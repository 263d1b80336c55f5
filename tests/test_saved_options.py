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
def test_a_function_option_that_differs_is_refused_before_any_weight_is_copied(name):
    option, value = FUNCTION_OPTION[name]
    saved, other = _pair(name, **{option: value})
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=rf"built with {option}={value!r} \(this head: .*\).* Build the head with"):
        other.load_state_dict(saved.state_dict())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing was loaded


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
    assert getattr(other, option, None) != value or option == "dropout"
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
    with pytest.raises(ValueError, match=r"^1: the checkpoint holds a ContextAwareClassifier's weights, this is a "
                       "SSAClassifier"):  # fmt: skip
        nn.Sequential(nn.Conv2d(3, 8, 1), SSAClassifier(8, 3)).load_state_dict(model.state_dict())
    saved = PrototypeClassifier(8, 3, num_prototypes=4).state_dict()
    with pytest.raises(ValueError, match=r"num_prototypes=4 \(this head: 10\)"):
        PrototypeClassifier(8, 3).load_state_dict(saved)


def test_a_subclass_loads_its_library_heads_checkpoint():
    class MyHead(ContextAwareClassifier):
        pass

    MyHead(8, 3).load_state_dict(ContextAwareClassifier(8, 3).state_dict())


def test_the_options_are_one_uint8_tensor_that_safetensors_keeps(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    head = SSAClassifier(8, 3, tau=12.0)
    state = head.state_dict()
    assert state["_extra_state"].dtype == torch.uint8 and state["_extra_state"].dim() == 1
    safetensors.save_file(state, tmp_path / "head.safetensors")
    loaded = safetensors.load_file(tmp_path / "head.safetensors")
    SSAClassifier(8, 3, tau=12.0).load_state_dict(loaded)
    with pytest.raises(ValueError, match=r"tau=12\.0"):
        SSAClassifier(8, 3).load_state_dict(loaded)


def test_a_state_dict_without_options_loads_when_not_strict():
    """Weights filtered by hand (or saved before 0.2): no options to compare; strict loading names the key."""
    weights = {k: v for k, v in ContextAwareClassifier(8, 3).state_dict().items() if k != "_extra_state"}
    ContextAwareClassifier(8, 3).load_state_dict(weights, strict=False)
    with pytest.raises(RuntimeError, match="_extra_state"):
        ContextAwareClassifier(8, 3).load_state_dict(weights)
