"""HF transformers integration (skips without transformers)."""

import functools
import json
import warnings

import pytest
import torch

from adaptive_heads import ContextAwareClassifier, ContextAwareLoss, SSAClassifier, slide_inference
from adaptive_heads.registry import HEADS

from ..conftest import assert_dropout_on_the_coarse_path_only

transformers = pytest.importorskip("transformers")
from adaptive_heads.integrations.hf import AdaptiveSegmentationModel, AdaptiveTrainer  # noqa: E402


def _segformer():
    config = transformers.SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
        decoder_hidden_size=16, num_labels=5, semantic_loss_ignore_index=255,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.SegformerForSemanticSegmentation(config)


def _upernet():
    stages = ["stage1", "stage2", "stage3", "stage4"]
    backbone = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=stages
    )
    config = transformers.UperNetConfig(
        backbone_config=backbone,
        hidden_size=16,
        auxiliary_channels=8,
        num_labels=5,
        use_auxiliary_head=True,
        auxiliary_in_channels=24,  # stage 3 (transformers before 5 defaults to 384 instead of the backbone's)
    )
    torch.manual_seed(0)
    return transformers.UperNetForSemanticSegmentation(config)


@pytest.mark.parametrize("head_cls", list(HEADS.values()), ids=list(HEADS))
def test_segformer_loss_includes_adaptive_terms(head_cls):
    base = _segformer()
    model = AdaptiveSegmentationModel(base, head_cls)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    model.train()
    out = model(pixel_values=images, labels=labels)
    assert out.logits.shape == (2, 5, 8, 8)
    extra = model.last_losses["adaptive_loss"]
    # the model's own CE on the returned logits + the extra terms
    up = torch.nn.functional.interpolate(out.logits, size=(32, 32), mode="bilinear", align_corners=False)
    own = torch.nn.functional.cross_entropy(up, labels, ignore_index=255)
    torch.testing.assert_close(out.loss.detach(), own.detach() + extra, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    head = base.decode_head.classifier
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    model.eval()
    with torch.no_grad():
        assert model(pixel_values=images).logits.shape == (2, 5, 8, 8)


def test_upernet_main_and_auxiliary_heads():
    base = _upernet()
    model = AdaptiveSegmentationModel(base, ContextAwareClassifier, include_aux=True)
    assert isinstance(base.decode_head.classifier, ContextAwareClassifier)
    assert isinstance(base.auxiliary_head.classifier, ContextAwareClassifier)
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    out = model(pixel_values=images, labels=labels)
    assert {"decode_head.classifier.distill", "auxiliary_head.classifier.distill"} <= set(model.last_losses)
    out.loss.backward()
    assert base.auxiliary_head.classifier.apd_proj[0].weight.grad is not None


def test_wrapper_requires_a_head():
    with pytest.raises(ValueError, match="no adaptive head"):
        AdaptiveSegmentationModel(_segformer())


class _Scenes(torch.utils.data.Dataset):
    """A tiny in-memory dataset in the form HF segmentation pipelines produce (``pixel_values``, ``labels``)."""

    def __init__(self, count: int = 8, size: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, size, size, generator=g)
        self.labels = torch.randint(0, 5, (count, size, size), generator=g)
        self.labels[:, :2] = 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


@pytest.mark.parametrize("head_cls", list(HEADS.values()), ids=list(HEADS))
def test_trainer_trains_and_save_pretrained_round_trips(head_cls, tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    model = AdaptiveSegmentationModel(_upernet(), head_cls, include_aux=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Scenes())
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    head_keys = [k for k in before if k.startswith("model.decode_head.classifier.")]
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in head_keys)  # the head trained

    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    heads = config["adaptive_heads"]["heads"]
    assert set(heads) == {"decode_head.classifier", "auxiliary_head.classifier"}
    assert heads["decode_head.classifier"]["type"] == head_cls.__name__
    assert not hasattr(model.config, "adaptive_heads")  # the live config is left as it was

    reloaded = AdaptiveSegmentationModel.from_pretrained(folder)
    images = torch.randn(2, 3, 32, 32)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values=images).logits, model(pixel_values=images).logits, rtol=0, atol=0
        )
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_adaptive_trainer_refuses_an_optimizer_built_before_the_heads(tmp_path):
    """A fused AdamW (the Trainer's default on torch >= 2.8) built on the plain model holds the replaced conv: the
    Trainer would train without the head. Refused before the first step, exactly (its parameter groups)."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    base = _segformer()
    fused = {"fused": True} if "fused" in torch.optim.AdamW.__init__.__code__.co_varnames else {}
    early = torch.optim.AdamW(base.parameters(), lr=1e-3, **fused)
    model = AdaptiveSegmentationModel(base, "cac")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=2, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = AdaptiveTrainer(model=model, args=args, train_dataset=_Scenes(), optimizers=(early, None))
    with pytest.raises(ValueError, match=r"does not hold the trainable parameters of the adaptive head\(s\) \['model"):
        trainer.train()
    AdaptiveTrainer(model=model, args=args, train_dataset=_Scenes()).train()  # its own optimizer: built after


def test_plain_transformers_load_of_a_saved_folder_reinitialises_the_classifier(tmp_path):
    model = AdaptiveSegmentationModel(_segformer(), ContextAwareClassifier)
    model.save_pretrained(tmp_path)
    plain, info = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert {"decode_head.classifier.weight", "decode_head.classifier.bias"} <= set(info["missing_keys"])
    assert any(k.startswith("decode_head.classifier.proj.") for k in info["unexpected_keys"])
    assert isinstance(plain.decode_head.classifier, torch.nn.Conv2d)  # a fresh plain classifier
    with pytest.warns(
        UserWarning,
        match=r"saved by AdaptiveSegmentationModel.save_pretrained .* plain .*"
        r"\['decode_head.classifier'\] are freshly initialised .* AdaptiveSegmentationModel.from_pretrained",
    ):
        AdaptiveSegmentationModel(plain, "cac")  # wrapping it again would train a fresh head: said, not silent
    reloaded = AdaptiveSegmentationModel.from_pretrained(tmp_path)  # the adaptive class loads it whole
    images = torch.randn(1, 3, 32, 32)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=images).logits, model(pixel_values=images).logits)
    fresh = tmp_path / "fresh"
    _segformer().save_pretrained(fresh)
    with pytest.raises(ValueError, match="not saved by AdaptiveSegmentationModel"):
        AdaptiveSegmentationModel.from_pretrained(fresh)


# ----------------------------------------------------------------------------- the seams (issue 22)
@pytest.mark.parametrize("name", ["cac", "ssa"])
def test_segformer_dropout_moves_to_the_coarse_path(name):
    config = _segformer().config
    # no dropout inside the encoder, so that two forwards see the same features; 0.1 before the classifier
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = config.drop_path_rate = 0.0
    config.classifier_dropout_prob = 0.1
    torch.manual_seed(0)
    base = transformers.SegformerForSemanticSegmentation(config)
    AdaptiveSegmentationModel(base, HEADS[name])  # replaces the classifier of base in place
    head = base.decode_head.classifier
    assert isinstance(base.decode_head.dropout, torch.nn.Identity) and head.dropout.p == 0.1
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    assert_dropout_on_the_coarse_path_only(base, lambda: base(pixel_values=images), labels, ["decode_head.classifier"])


def test_heads_take_the_models_ignore_index_and_auxiliary_weight():
    base = _upernet()
    base.config.loss_ignore_index = 250  # UperNet's name for it (Segformer: semantic_loss_ignore_index)
    base.config.auxiliary_loss_weight = 0.3
    model = AdaptiveSegmentationModel(base, ContextAwareClassifier, include_aux=True)
    assert base.decode_head.classifier.ignore_index == 250
    assert base.adaptive_head_weights == {"auxiliary_head.classifier": 0.3}
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    labels[:, :8] = 250
    model.train()
    model(pixel_values=images, labels=labels)
    terms = model.last_losses
    extra = ("ce_coarse", "ce_teacher", "distill")
    main = sum(terms[f"decode_head.classifier.{k}"] for k in extra)
    aux = sum(terms[f"auxiliary_head.classifier.{k}"] for k in extra)
    torch.testing.assert_close(terms["adaptive_loss"], main + 0.3 * aux)


def test_wrapper_takes_a_head_name_with_options_and_refuses_a_mismatched_ignore_index():
    model = AdaptiveSegmentationModel(_segformer(), "ssa", tau=10.0)
    assert model.model.decode_head.classifier.tau == 10.0
    assert model.model.adaptive_head_paths == ["decode_head.classifier"]
    with pytest.raises(TypeError, match="given without a head"):
        AdaptiveSegmentationModel(model.model, tau=10.0)
    with pytest.raises(
        ValueError, match=r"'decode_head.classifier' ignores the label -1 but the model's own loss ignores 255"
    ):
        AdaptiveSegmentationModel(_segformer(), "cac", ignore_index=-1)
    base = _segformer()
    base.config.semantic_loss_ignore_index = 0
    assert AdaptiveSegmentationModel(base, "cac").model.decode_head.classifier.ignore_index == 0  # the config's
    for factory in (lambda c, n: ContextAwareClassifier(c, n), functools.partial(lambda c, n: SSAClassifier(c, n))):
        base = _segformer()  # any (in_channels, num_classes) callable: built, then given the config's label
        base.config.semantic_loss_ignore_index = 0
        assert AdaptiveSegmentationModel(base, factory).model.decode_head.classifier.ignore_index == 0


def test_adaptive_trainer_logs_every_term_averaged_since_the_last_log(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    model = AdaptiveSegmentationModel(_upernet(), "ssa", include_aux=True)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(dict(module.last_losses)))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, logging_steps=2, disable_tqdm=True,
    )  # fmt: skip
    trainer = AdaptiveTrainer(model=model, args=args, train_dataset=_Scenes())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and len(seen) == 4
    terms = set(seen[0])
    assert {"decode_head.classifier.distill", "auxiliary_head.classifier.relation"} <= terms
    for entry, steps in zip(logs, (seen[:2], seen[2:]), strict=True):
        for name in terms:
            assert entry[name] == pytest.approx(sum(float(s[name]) for s in steps) / 2, abs=1e-4), name


# ----------------------------------------------------------------------------- training and inference seams (issue 33)
def _segformer_without_batch_statistics():
    """The tiny Segformer without dropout and with its decode head's BatchNorm as ``nn.Identity``, and a CAC head
    whose loss is a mean over the batch's pixels (an oracle per image, no distillation, which the official code
    averages per class over the whole batch): a batch of 4 and 4 batches of 1 then have the same gradient."""
    config = _segformer().config
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = config.drop_path_rate = 0.0
    config.classifier_dropout_prob = 0.0
    torch.manual_seed(0)
    base = transformers.SegformerForSemanticSegmentation(config)
    base.decode_head.batch_norm = torch.nn.Identity()
    loss = ContextAwareLoss(weights={"distill": 0.0})
    return AdaptiveSegmentationModel(base, "cac", teacher_pooling="image", loss_fns=loss)


@pytest.mark.parametrize("trainer_cls", ["Trainer", "AdaptiveTrainer"])
def test_gradient_accumulation_gives_the_update_and_the_loss_of_the_whole_batch(trainer_cls, tmp_path):
    """``gradient_accumulation_steps=4`` × batch 1 gives the SGD update and the logged loss of 1 × batch 4: the
    wrapper's loss is a per-batch mean, so the Trainer must divide it by the accumulation steps (transformers ≥ 4.46
    skips that division for a model whose ``forward`` takes ``**kwargs``, unless ``accepts_loss_kwargs`` is False)."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    trainer_type = AdaptiveTrainer if trainer_cls == "AdaptiveTrainer" else transformers.Trainer
    data = _Scenes(count=4)
    data.labels = torch.randint(0, 5, data.labels.shape, generator=torch.Generator().manual_seed(1))  # none ignored
    runs = {}
    for batch, steps in ((4, 1), (1, 4)):
        model = _segformer_without_batch_statistics()
        before = {k: v.clone() for k, v in model.named_parameters()}
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"{batch}x{steps}"), max_steps=1, per_device_train_batch_size=batch,
            gradient_accumulation_steps=steps, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
            disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = trainer_type(model=model, args=args, train_dataset=data)
        trainer.train()
        loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
        runs[batch] = loss, {k: (p.detach() - before[k]) for k, p in model.named_parameters()}
    (whole_loss, whole_update), (accumulated_loss, accumulated_update) = runs[4], runs[1]
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-3)  # the transformers 5 logs round to 4 digits
    head_update = [k for k in whole_update if k.startswith("model.decode_head.classifier.")]
    assert head_update and any(whole_update[k].abs().max() > 0 for k in head_update)
    for name, update in whole_update.items():
        torch.testing.assert_close(accumulated_update[name], update, rtol=1e-4, atol=1e-7, msg=name)


def test_image_context_slide_inference_through_the_wrapper_of_a_model_with_an_adaptive_aux_head(tmp_path):
    """UperNet with adaptive main and auxiliary heads: the wrapper's main head (recorded on the HF model inside it)
    builds the image context; one tile covering the image equals the plain forward."""
    torch.manual_seed(0)
    model = AdaptiveSegmentationModel(_upernet(), "cac", include_aux=True).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        whole = torch.nn.functional.interpolate(
            model(pixel_values=images).logits, size=(64, 64), mode="bilinear", align_corners=False
        )
    one_tile = slide_inference(model, images, 64, 64, context="image")
    torch.testing.assert_close(one_tile, whole, rtol=1e-5, atol=1e-5)
    tiled = slide_inference(model, images, 32, 16, context="image")
    named = slide_inference(model, images, 32, 16, context="image", head="model.decode_head.classifier")
    assert torch.isfinite(tiled).all()
    torch.testing.assert_close(tiled, named, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    reloaded = AdaptiveSegmentationModel.from_pretrained(tmp_path)  # its heads replaced path by path
    torch.testing.assert_close(slide_inference(reloaded.eval(), images, 32, 16, context="image"), tiled)


def test_from_pretrained_warns_of_weights_saved_with_other_head_options(tmp_path):
    """config.json's options build the head; the ones saved with the weights are compared with them (transformers 5
    loads through set_extra_state, 4.x through _load_from_state_dict: both warn, naming the option)."""
    AdaptiveSegmentationModel(_segformer(), "cac", tau=10.0).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["adaptive_heads"]["heads"]["decode_head.classifier"]["options"]["tau"] = 15.0  # edited by hand
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"tau=10\.0 \(this head: 15\.0\)"):
        model = AdaptiveSegmentationModel.from_pretrained(tmp_path)
    assert model.model.decode_head.classifier.tau == 15.0


def test_from_pretrained_takes_an_ignore_index_override_for_the_model_and_its_heads(tmp_path):
    AdaptiveSegmentationModel(_segformer(), "ssa").save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AdaptiveSegmentationModel.from_pretrained(tmp_path, semantic_loss_ignore_index=0)
    assert not [w for w in caught if "built with" in str(w.message)]  # the override is on purpose: no such warning
    assert model.config.semantic_loss_ignore_index == 0 and model.model.decode_head.classifier.ignore_index == 0
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    labels[:, :8] = 0
    assert torch.isfinite(model.train()(pixel_values=images, labels=labels).loss)


# ----------------------------------------------------------------------------- checkpoints (issue 32)
@pytest.mark.parametrize("name", list(HEADS))
def test_from_pretrained_fine_tunes_onto_another_class_count_as_transformers_does(name, tmp_path):
    """HF's recipe: from_pretrained(folder, num_labels=7, ignore_mismatched_sizes=True) builds the model and its
    head for 7 classes and loads every tensor whose shape fits."""
    model = AdaptiveSegmentationModel(_segformer(), name)
    model.save_pretrained(tmp_path)
    saved = model.state_dict()
    tuned = AdaptiveSegmentationModel.from_pretrained(tmp_path, num_labels=7, ignore_mismatched_sizes=True)
    head = tuned.model.decode_head.classifier
    assert tuned.config.num_labels == 7 and head.num_classes == 7 and len(tuned.config.id2label) == 7
    fitted = 0
    for key, value in tuned.state_dict().items():
        if key.endswith("_extra_state"):
            continue
        if saved[key].shape == value.shape:
            assert torch.equal(value, saved[key]), key
            fitted += key.startswith("model.decode_head.classifier.")
        else:
            assert key.startswith("model.decode_head.classifier."), key
    assert fitted > 2  # the head's projectors (or ProtoSeg's embedding) came from the checkpoint
    images = torch.randn(1, 3, 32, 32)
    assert tuned.eval()(pixel_values=images).logits.shape == (1, 7, 8, 8)
    with pytest.raises((RuntimeError, ValueError), match=r"mismatch|size"):  # without the flag: transformers refuses
        AdaptiveSegmentationModel.from_pretrained(tmp_path, num_labels=7)


@pytest.mark.parametrize("name", list(HEADS))
def test_fine_tuning_from_pretrained_gives_the_new_head_tensors_the_heads_own_init(name, tmp_path):
    """transformers initialises what it could not load with the model's _init_weights (N(0, 0.02²)) or leaves it
    as allocated (ProtoSeg's prototype buffer: NaN logits): each head tensor gets the head's own init instead."""
    AdaptiveSegmentationModel(_segformer(), name, init_std=0.01).save_pretrained(tmp_path)
    torch.manual_seed(0)
    tuned = AdaptiveSegmentationModel.from_pretrained(tmp_path, num_labels=64, ignore_mismatched_sizes=True)
    head = tuned.model.decode_head.classifier
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 64, (2, 32, 32))
    out = tuned.train()(pixel_values=images, labels=labels)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    if name == "proto":  # unit prototypes of a truncated normal draw
        norms = head.prototypes.norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
        assert head.prototypes.std(dim=(0, 1)).mean() > 0.1  # drawn, not one repeated value
    else:  # mmseg's N(0, init_std²) weight and zero bias for the coarse classifier: 64 × 16 draws
        weight = head.conv_seg.weight
        assert 0.008 < float(weight.std()) < 0.012 and not head.conv_seg.bias.any()
    if name == "ssa":  # nn.Embedding's N(0, 1), not transformers' N(0, 0.02²)
        assert 0.9 < float(head.center_pos.weight.std()) < 1.1


def test_from_pretrained_sets_protosegs_non_persistent_counts(tmp_path):
    model = AdaptiveSegmentationModel(_segformer(), "proto")
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    model.train()(pixel_values=images, labels=labels)
    assert model.model.decode_head.classifier.usage_counts.sum() > 0
    model.save_pretrained(tmp_path)
    for _ in range(2):  # also over memory a previous model left behind
        loaded = AdaptiveSegmentationModel.from_pretrained(tmp_path)
        assert torch.equal(loaded.model.decode_head.classifier.usage_counts, torch.zeros(5, 10))


def test_from_pretrained_loads_weights_without_the_saved_options_with_a_warning(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = AdaptiveSegmentationModel(_segformer(), "ssa", tau=10.0)
    model.save_pretrained(tmp_path)
    weights = safetensors.load_file(tmp_path / "model.safetensors")
    assert any(k.endswith("_extra_state") for k in weights)
    weights = {k: v for k, v in weights.items() if not k.endswith("_extra_state")}  # filtered, or saved by 0.1
    safetensors.save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"no saved options for \['decode_head\.classifier\._extra_state'\]"):
        reloaded = AdaptiveSegmentationModel.from_pretrained(tmp_path)
    assert reloaded.model.decode_head.classifier.tau == 10.0
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
