"""The CamVid example on a tiny folder the test writes itself in the source's layout (no download needed)."""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="the CamVid example needs Pillow (the examples extra)")
from PIL import Image

import adaptive_heads as ah
from examples import camvid_data, train_camvid
from examples.segmentation_net import SegmentationNet


def write_camvid(root, splits=("train", "val"), frames=3, size=(36, 48), seed=0):
    """Random frames and labels (0–11, 11 = Unlabelled) named like CamVid's: two sequences per split, and in train a
    third, 0006R0 (the default held-out sequence), after ``frames``."""
    rng = np.random.default_rng(seed)
    for split in splits:
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        names = [f"{'0016E5' if i % 2 else 'Seq05VD'}_{i:05d}.png" for i in range(frames)]
        names += [f"0006R0_{i:05d}.png" for i in range(2)] if split == "train" else []
        for i, name in enumerate(names):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / name)
            labels = rng.integers(0, 12, size, dtype=np.uint8)
            labels[: size[0] // 2] = i % 11  # a large region, so crops are not pure noise
            Image.fromarray(labels).save(root / f"{split}annot" / name)
    return root


def test_quick_run_writes_results(tmp_path):
    data = write_camvid(tmp_path / "CamVid", splits=("train", "val", "test"))
    out = tmp_path / "results"
    result = train_camvid.main(
        ["--data", str(data), "--quick", "--no-progress", "--out", str(out), "--checkpoints", str(tmp_path / "ck")]
    )
    saved = json.loads((out / "camvid-quick.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))
    assert [r["classifier"] for r in saved["runs"]] == ["conv", "cosine", "cac", "ssa", "proto"]
    for run in saved["runs"]:
        assert run["seed"] == 0 and 0.0 <= run["val_miou"] <= 100.0
        assert set(run["per_class_iou"]) == set(camvid_data.CLASSES)
        assert run["curve"][-1] == [1, run["val_miou"]] and run["s_per_epoch"] > 0
        assert set(run["splits"]) == {"val", "test", "unseen"}  # every split present is evaluated at the end
        assert set(run["splits"]["unseen"]["per_sequence"]) == {"0006R0"} and run["splits"]["unseen"]["frames"] == 2
        assert set(run["splits"]["test"]["per_sequence"]) == {"0016E5", "Seq05VD"}
    assert (out / "camvid-quick_miou.png").stat().st_size > 0
    assert (out / "camvid-quick_predictions.png").stat().st_size > 0
    # --resume finds the finished runs and reproduces their records without training
    again = train_camvid.main(
        ["--data", str(data), "--quick", "--no-progress", "--no-plots", "--resume", "--out", str(out),
         "--checkpoints", str(tmp_path / "ck")]
    )  # fmt: skip
    for a, b in zip(again["runs"], result["runs"], strict=True):
        assert a["val_miou"] == b["val_miou"] and a["curve"] == b["curve"]
    text = train_camvid.render(out / "camvid-quick.json", update=False)  # the README block and the docs page
    assert "A ResNet-FPN trained from scratch" in text and "| proto |" in text and "### test (3 frames)" in text
    assert "| cosine |" in text and "### unseen (2 frames)" in text
    # fitting each classifier onto the trained conv network, ProtoSeg also from k-means prototypes
    tuned = train_camvid.main(
        ["--data", str(data), "--quick", "--no-progress", "--no-plots", "--out", str(out), "--checkpoints",
         str(tmp_path / "ck"), "--finetune-from", "camvid-quick", "--tag", "finetune-quick"]
    )  # fmt: skip
    assert [r["classifier"] for r in tuned["runs"]] == ["conv", "cosine", "cac", "ssa", "proto", "proto-kmeans"]
    assert tuned["config"]["finetune_from"] == "camvid-quick"
    from examples import camvid_tiles

    tiles = camvid_tiles.main(
        ["--data", str(data), "--run", str(out / "camvid-quick.json"), "--checkpoints", str(tmp_path / "ck"),
         "--out", str(tmp_path / "tiles.json")]
    )  # fmt: skip
    assert [r["classifier"] for r in tiles["rows"]] == ["cac", "ssa"]
    assert all(0 <= r[m] <= 100 for r in tiles["rows"] for m in ("whole", "static", "tile", "image", "image_all"))
    from examples import camvid_diagnose

    diagnosis = camvid_diagnose.main(
        ["--data", str(data), "--run", str(out / "camvid-quick.json"), "--checkpoints", str(tmp_path / "ck"),
         "--classifiers", "conv", "cac", "ssa"]
    )  # fmt: skip
    rows = diagnosis["rows"]
    assert [(r["classifier"], r["split"]) for r in rows][:3] == [("conv", "val"), ("conv", "unseen"), ("conv", "test")]
    for row in rows:
        assert 0 <= row["coarse_miou"] <= 100 and 1 / 11 <= row["confidence"] <= 1
        assert all(0 <= v <= 1 for v in row["purity"].values())
        assert abs(sum(row["class_share"].values()) - 1) < 1e-6
    conv = [r for r in rows if r["classifier"] == "conv"]
    assert all(r["coarse_miou"] == r["miou"] for r in conv)  # a plain conv's coarse prediction is its prediction
    from examples import camvid_robust

    robust = tmp_path / "robust.json"
    camvid_robust.main(
        ["--data", str(data), "--run", str(out / "camvid-quick.json"), "--checkpoints", str(tmp_path / "ck"),
         "--out", str(robust), "--baseline", str(out / "camvid-quick.json"), "--mix", "0", "1"]
    )  # fmt: skip
    rows = json.loads(robust.read_text())["rows"]
    assert [camvid_robust.variant_name(r) for r in rows] == [
        "cac", "cac+mix1", "cac+predicted@inference", "ssa", "ssa+mix1", "ssa+predicted@inference"
    ]  # fmt: skip
    official = next(r for r in diagnosis["rows"] if (r["classifier"], r["split"]) == ("cac", "val"))
    assert rows[0]["splits"]["val"]["miou"] == pytest.approx(official["miou"])  # the trained network as it was
    assert all(set(r["splits"]) == {"val", "unseen"} for r in rows)


def test_reader_pairs_files_and_maps_unlabelled_to_ignore(tmp_path):
    data = write_camvid(tmp_path / "CamVid", splits=("val",), frames=2)
    split = camvid_data.load_split(data, "val")
    raw = np.asarray(Image.open(data / "valannot" / split.files[0]))
    assert split.images.shape == (2, 36, 48, 3) and split.labels.shape == (2, 36, 48)
    assert np.array_equal(split.labels[0] == camvid_data.IGNORE_INDEX, raw == 11)
    assert np.array_equal(split.labels[0][raw != 11], raw[raw != 11])
    assert camvid_data.splits_present(data) == ["val"]
    (data / "valannot" / split.files[1]).unlink()
    with pytest.raises(FileNotFoundError, match="have no label"):
        camvid_data.load_split(data, "val")


def test_missing_train_split_is_a_clear_error(tmp_path):
    data = write_camvid(tmp_path / "CamVid", splits=("val",), frames=1)
    with pytest.raises(SystemExit, match="must hold train/"):
        train_camvid.main(["--data", str(data), "--quick", "--out", str(tmp_path)])


def test_training_samples_are_deterministic_crops(tmp_path):
    split = camvid_data.load_split(write_camvid(tmp_path / "CamVid", splits=("train",)), "train")
    ds = camvid_data.TrainDataset(split, 40, [100.0] * 3, [50.0] * 3, seed=3)
    a, b = ds[1], ds[1]
    assert a[0].shape == (3, 40, 40) and a[1].shape == (40, 40) and a[1].dtype == torch.long
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same (seed, epoch, index): same sample
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], a[0])
    labels = set(torch.unique(a[1]).tolist())
    assert labels <= set(range(11)) | {camvid_data.IGNORE_INDEX}


def test_channel_statistics_match_numpy():
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    mean, std = camvid_data.channel_statistics(images)
    flat = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-12)


def test_hsv_conversion_matches_colorsys():
    rgb = np.random.default_rng(1).uniform(0, 255, (200, 3)).astype(np.float32)
    hsv = camvid_data._rgb_to_hsv(rgb)
    ref = np.array([colorsys.rgb_to_hsv(*(c / 255.0)) for c in rgb.astype(np.float64)])
    np.testing.assert_allclose(hsv[:, 0], ref[:, 0] * 180.0, atol=1e-3)
    np.testing.assert_allclose(hsv[:, 1:], ref[:, 1:] * 255.0, atol=1e-3)
    np.testing.assert_allclose(camvid_data._hsv_to_rgb(hsv), rgb, atol=1e-3)


def test_metrics_from_confusion_matrix():
    pred = torch.tensor([0, 0, 1, 1, 2])
    target = torch.tensor([0, 1, 1, 255, 2])
    conf = train_camvid.confusion_matrix(pred, target)
    assert conf.sum() == 4  # the ignored pixel is not counted
    s = train_camvid.scores(conf)
    # IoU: class 0: 1/(2+1-1) = 0.5, class 1: 1/2 = 0.5, class 2: 1; classes 3..10 absent → left out
    assert s["miou"] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
    assert s["pixel_acc"] == pytest.approx(75.0)
    assert s["per_class_iou"]["Road"] is None


def test_poly_schedule():
    assert train_camvid.poly_lr(0, 100, 10) == pytest.approx(1e-6)
    assert train_camvid.poly_lr(5, 100, 10) == pytest.approx(0.5, abs=1e-6)
    assert train_camvid.poly_lr(10, 100, 10) == pytest.approx(0.9**0.9)
    assert train_camvid.poly_lr(100, 100, 10) == 0.0


def test_network_classifier_is_found_and_replaced():
    import adaptive_heads as ah

    net = SegmentationNet(11)
    assert ah.find_classifier(net) == ["decoder.classifier"]  # via net.num_classes
    x = torch.randn(2, 3, 64, 96)
    assert net(x).shape == (2, 11, 64, 96)
    ah.replace_classifier(net, ah.ContextAwareClassifier)
    assert isinstance(net.decoder.classifier, ah.ContextAwareClassifier)
    net.eval()
    assert net(x).shape == (2, 11, 64, 96)


def test_unet_decoder_has_a_3x3_classifier_every_head_replaces():
    import adaptive_heads as ah

    for name, head in ah.HEADS.items():
        net = SegmentationNet(11, decoder="unet").eval()
        assert net.decoder.classifier.kernel_size == (3, 3)
        x = torch.randn(1, 3, 64, 64)
        before = net(x)
        ah.replace_classifier(net, head, path="decoder.classifier")
        after = net(x)
        assert after.shape == before.shape == (1, 11, 64, 64), name


def test_static_classifier_gives_the_coarse_logits_and_restores_the_head():
    from examples import camvid_tiles

    torch.manual_seed(0)
    head = ah.ContextAwareClassifier(8, 3).eval()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), head).eval()
    x = torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        adaptive = model(x)
        static = camvid_tiles.static_logits(model, x)
        coarse = head.conv_seg(model[0](x))
    torch.testing.assert_close(static, coarse)
    assert not torch.allclose(adaptive, static, atol=1e-3)
    torch.testing.assert_close(model(x).detach(), adaptive)  # the head is itself again afterwards


def test_recorded_arguments_name_no_local_folder():
    argv = ["--data", "/x/CamVid", "--seeds", "0", "--out=/y", "--checkpoints", "z", "--data=/w", "--quick"]
    assert train_camvid.recorded_arguments(argv) == ["--seeds", "0", "--quick"]


def _quick(data, tmp_path, *extra):
    return ["--data", str(data), "--quick", "--no-progress", "--no-plots", "--out", str(tmp_path / "out"),
            "--checkpoints", str(tmp_path / "ck"), *extra]  # fmt: skip


def test_finetuning_starts_from_the_trained_conv_network(tmp_path):
    data = write_camvid(tmp_path / "CamVid")
    train_camvid.main(_quick(data, tmp_path, "--classifiers", "conv"))
    trained = torch.load(tmp_path / "ck" / "camvid-quick-conv-s0.pt", weights_only=False)["model"]
    args = train_camvid.parse_args(_quick(data, tmp_path, "--finetune-from", "camvid-quick"))
    split = train_camvid.load_data(args)["train"]
    fit = (split, camvid_data.channel_statistics(split.images))
    models = {
        name: train_camvid.build_model(name, args, 0, fit=fit) for name in ("cosine", "cac", "proto", "proto-kmeans")
    }
    for model in models.values():
        encoder = {k: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
        assert all(torch.equal(v, trained[k]) for k, v in encoder.items())
    conv_weight = trained["decoder.classifier.weight"]
    assert torch.equal(models["cac"].decoder.classifier.conv_seg.weight, conv_weight)
    assert torch.equal(models["cosine"].decoder.classifier.weight, conv_weight.flatten(1))
    random, fitted = models["proto"].decoder.classifier, models["proto-kmeans"].decoder.classifier
    assert not torch.allclose(random.prototypes, fitted.prototypes)
    assert fitted.prototype_diversity().mean() > random.prototype_diversity().mean()  # data, not noise
    with pytest.raises(SystemExit):
        train_camvid.parse_args(_quick(data, tmp_path, "--classifiers", "proto-kmeans"))  # needs a trained network


def test_same_command_same_numbers_and_resume_continues_exactly(tmp_path, monkeypatch):
    """Two runs of one command agree bit for bit; a run interrupted after an epoch and resumed ends where the
    uninterrupted one does (the dropout and Gumbel draws continue from the checkpoint's random state)."""
    data = write_camvid(tmp_path / "CamVid")
    small = ["--epochs", "2", "--classifiers", "cosine", "proto", "--tag", "repro"]
    first = train_camvid.main(_quick(data, tmp_path / "a", *small))
    again = train_camvid.main(_quick(data, tmp_path / "b", *small))
    saves = []
    real_save = train_camvid.torch.save

    def save_then_stop(obj, path):
        real_save(obj, path)
        saves.append(path)
        if len(saves) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_camvid.torch, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_camvid.main(_quick(data, tmp_path / "c", *small))
    monkeypatch.setattr(train_camvid.torch, "save", real_save)
    resumed = train_camvid.main(_quick(data, tmp_path / "c", *small, "--resume"))
    for runs in (again["runs"], resumed["runs"]):
        for a, b in zip(first["runs"], runs, strict=True):
            assert a["curve"] == b["curve"] and a["splits"] == b["splits"]
    for name in ("cosine", "proto"):
        weights = [torch.load(tmp_path / d / "ck" / f"repro-{name}-s0.pt", weights_only=False)["model"] for d in "abc"]
        assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])


def test_robustness_setting_is_chosen_on_val_by_the_issue_criterion():
    from examples import camvid_robust

    classes = camvid_data.CLASSES

    def splits(val_miou, val_worst, unseen_miou):
        per_class = dict.fromkeys(classes, 50.0)
        return {
            "val": {"miou": val_miou, "per_class_iou": {**per_class, classes[0]: 50.0 + val_worst}},
            "unseen": {"miou": unseen_miou, "per_class_iou": per_class},
        }

    base = {("0006R0", seed): splits(40.0, 0.0, 30.0) for seed in (0, 1)}
    rows = []
    for head in ("cac", "ssa"):
        for mix, val_miou, val_worst, unseen in (
            (0.0, 48.0, -3.0, 99.0),
            (0.5, 45.0, -1.0, 0.0),
            (1.0, 46.0, 0.0, 0.0),
        ):
            for seed in (0, 1):
                rows.append({
                    "holdout_sequence": "0006R0", "classifier": head, "seed": seed, "trained_pooling": "soft",
                    "context_pooling": "soft", "coarse_mix": mix, "splits": splits(val_miou, val_worst, unseen),
                })  # fmt: skip
    table = camvid_robust.summarise(rows, base)
    # the official head (best val mIoU) loses 3 IoU on a class of val; of the others the better val mIoU wins,
    # whatever the held-out sequence says
    assert camvid_robust.select_on_val(table) == "+mix1"
    assert camvid_robust.qualifies_on_val(table, "+mix1") and not camvid_robust.qualifies_on_val(table, "")
    # none qualifies: the closest to the criterion (highest worst class on val), then the better val mIoU
    unqualified = [
        {**r, "splits": {**r["splits"], "val": {**r["splits"]["val"], "per_class_iou": {
            **r["splits"]["val"]["per_class_iou"], classes[0]: r["splits"]["val"]["per_class_iou"][classes[0]] - 3
        }}}} for r in rows
    ]  # fmt: skip
    assert camvid_robust.select_on_val(camvid_robust.summarise(unqualified, base)) == "+mix1"
    assert camvid_robust.select_on_val(table, holdout_sequence="0001TP") is None
    entry = next(e for e in table if e["variant"] == "cac+mix0.5")
    assert entry["val"]["delta_mean"] == 5.0 and entry["val"]["worst_class_delta"] == -1.0
    assert entry["unseen"]["seeds_gained"] == 0
    official = [r for r in rows if r["coarse_mix"] == 0.0]
    text = camvid_robust.headline({"rows": rows}, base, official)
    assert (
        "a CamVid sequence held out of training, 2 seeds each, the official CAC / SSA-Seg: +69.0 / +69.0 mIoU on 0006R0"
        in text
    )
    assert "No robustness setting has been run on every seed of every held-out sequence yet" in text


def _robust_rows(held_out: str, head: str, pooling: str, seeds, unseen: float, worst: float = 0.0) -> list[dict]:
    classes = camvid_data.CLASSES
    per_class = dict.fromkeys(classes, 50.0)
    return [
        {
            "run": f"{pooling}-{held_out}.json",
            "holdout_sequence": held_out,
            "classifier": head,
            "seed": seed,
            "trained_pooling": pooling,
            "context_pooling": pooling,
            "coarse_mix": 0.0,
            "splits": {
                "val": {"miou": 40.0, "per_class_iou": per_class},
                "unseen": {"miou": unseen, "per_class_iou": {**per_class, classes[1]: 50.0 + worst}},
            },
        }
        for seed in seeds
    ]


def test_robust_report_claims_the_goal_only_on_every_seed_of_both_held_out_sequences():
    from examples import camvid_robust

    per_class = dict.fromkeys(camvid_data.CLASSES, 50.0)
    conv = {"val": {"miou": 40.0, "per_class_iou": per_class}, "unseen": {"miou": 30.0, "per_class_iou": per_class}}
    base = {(held_out, seed): conv for held_out in ("0006R0", "0001TP") for seed in (0, 1, 2)}
    rows = []
    for head in ("cac", "ssa"):
        for held_out in ("0006R0", "0001TP"):
            rows += _robust_rows(held_out, head, "soft", (0, 1, 2), 31.0, worst=-4.0)  # official: +1, a class -4
        rows += _robust_rows("0006R0", head, "confident", (0, 1, 2), 33.0)  # +3 everywhere on the daylight one
    rows += _robust_rows("0001TP", "cac", "confident", (0,), 33.0)  # ... and one seed of the dusk one (partial)
    table = camvid_robust.summarise(rows, base)
    partial = next(e for e in table if e["variant"] == "cac[confident]" and e["holdout_sequence"] == "0001TP")
    assert not partial["complete"] and not camvid_robust.goal_met(partial)
    assert camvid_robust.goal_shortfall(partial) == 0.0  # its one seed meets it, which proves nothing
    assert set(camvid_robust.closest_to_goal(table)) == {"cac", "ssa"}
    assert all(setting == "" for setting, _ in camvid_robust.closest_to_goal(table).values())
    text = camvid_robust.headline({"rows": rows}, base, [r for r in rows if r["trained_pooling"] == "soft"])
    assert "No robustness setting has been run on every seed of every held-out sequence yet" in text
    rows += _robust_rows("0001TP", "cac", "confident", (1, 2), 33.0)  # complete for CAC: met on both
    rows += _robust_rows("0001TP", "ssa", "confident", (0, 1, 2), 31.5)  # SSA-Seg: +1.5 on the dusk one
    table = camvid_robust.summarise(rows, base)
    setting, entries = camvid_robust.closest_to_goal(table)["cac"]
    assert setting == "[confident]" and all(camvid_robust.goal_met(e) for e in entries)
    assert camvid_robust.closest_to_goal(table)["ssa"][0] == "[confident]"  # short 0.5 against the official 1
    text = camvid_robust.headline({"rows": rows}, base, [r for r in rows if r["trained_pooling"] == "soft"])
    assert (
        'better than the default pooling on both sequences: CAC `context_pooling="confident"`, SSA-Seg '
        '`context_pooling="confident"`, and the goal' in text
    )
    assert 'is met by CAC `context_pooling="confident"`.' in text
    assert "The choice made on `val` keeps the official pooling" in text  # the val columns are all equal
    with pytest.raises(ValueError, match="scored twice"):
        camvid_robust.summarise(rows + rows[:1], base)
    with pytest.raises(ValueError, match="no conv run"):
        camvid_robust.summarise(_robust_rows("0006R0", "cac", "soft", (7,), 31.0), base)


def test_adding_trained_rows_keeps_the_mixes_scored_on_the_same_networks(tmp_path):
    from examples import camvid_robust

    run = {
        "config": {"holdout_sequence": "0006R0", "head_options": "{}"},
        "runs": [{"classifier": "cac", "seed": 0, "splits": {s: {"miou": 1.0} for s in ("val", "unseen")}}],
    }
    source = tmp_path / "run.json"
    source.write_text(json.dumps(run))
    out = tmp_path / "robust.json"
    scored = {"run": "run.json", "holdout_sequence": "0006R0", "classifier": "cac", "seed": 0,
              "trained_pooling": "soft", "context_pooling": "soft", "splits": {}}  # fmt: skip
    out.write_text(json.dumps({"runs": {}, "rows": [{**scored, "coarse_mix": 0.0}, {**scored, "coarse_mix": 1.0}]}))
    camvid_robust.add_trained([source], out)
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["coarse_mix"] for r in rows) == [0.0, 1.0]  # the as-trained row replaced, the mix kept
    assert next(r for r in rows if r["coarse_mix"] == 0.0)["splits"]["val"] == {"miou": 1.0}
