"""Multi-process training: 2 CPU processes on the gloo backend.

- ProtoSeg: the synchronised Sinkhorn statistics and momentum update equal the single-process update on the
  concatenated batch.
- Every head inside a model wrapped in ``DistributedDataParallel`` (without ``find_unused_parameters``), trained
  two steps through ``supervise``: identical parameters and buffers on both ranks.
- CAC and SSA with ``"global"`` label pooling: logits, every loss term and every gradient equal one process on the
  concatenated batch; with the official ``"batch"`` pooling: equal to each rank training alone on its images.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import adaptive_heads as ah
from adaptive_heads.registry import HEADS

WORLD = 2
N_CLS, C, K = 4, 6, 3
POOLING = {"cac": "teacher_pooling", "ssa": "teacher_pooling"}  # the label-built branch of each cosine head

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed (gloo)"
)


def _inputs():
    g = torch.Generator().manual_seed(123)
    feat = torch.randn(4, C, 5, 6, generator=g)
    target = torch.randint(0, N_CLS, (4, 20, 24), generator=g)
    target[1, :8] = 255
    target[2:] = torch.where(target[2:] == 3, 1, target[2:])  # class 3 only on rank 0's images
    return feat, target


def _proto_head():
    torch.manual_seed(0)
    return ah.PrototypeClassifier(C, N_CLS, num_prototypes=K, update_assignment="argmax", gamma=0.5)


def _cosine_head(name: str, pooling: str):
    torch.manual_seed(0)
    return HEADS[name](C, N_CLS, dropout=0.0, **{POOLING[name]: pooling})


def _model(name: str):
    from .models import TinyFCN

    torch.manual_seed(0)
    options = {"update_assignment": "argmax", "num_prototypes": K} if name == "proto" else {}
    model = TinyFCN(num_classes=N_CLS, width=8, aux=False)
    return ah.replace_classifier(model, lambda c, n: HEADS[name](c, n, **options))


def _images():
    g = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, 16, 20, generator=g)
    target = torch.randint(0, N_CLS, (4, 16, 20), generator=g)
    target[0, :3] = 255
    return images, target


def _slice_output(out, sl: slice, batch: int):
    """The images ``sl`` of a structured head output (fields with a batch axis are sliced)."""
    fields = {}
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        fields[f.name] = value[sl] if torch.is_tensor(value) and value.dim() and value.shape[0] == batch else value
    return type(out)(**fields)


def _cosine_run(name: str, pooling: str, feat: torch.Tensor, target: torch.Tensor):
    """Forward, every loss term and backward of one head on ``feat``; returns what the test compares."""
    head = _cosine_head(name, pooling)
    x = feat.clone().requires_grad_(True)
    out = head(x, target)
    terms = head.default_loss().terms(out, target)
    sum(terms.values()).backward()
    label_built = out.teacher
    return {
        "logits": out.logits.detach(),
        "label_built": label_built.detach(),
        "terms": {k: v.detach() for k, v in terms.items()},
        "feat_grad": x.grad,
        "param_grads": {k: p.grad for k, p in head.named_parameters() if p.grad is not None},
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        feat, target = _inputs()
        per_rank = feat.shape[0] // WORLD
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        results = {}
        # ProtoSeg's synchronised update
        head = _proto_head()
        out = head(feat[sl], target[sl])
        results["proto"] = {"prototypes": head.prototypes, "target": out.proto_target}
        # CAC and SSA, head alone, both poolings; parameter gradients summed over the ranks
        for name in POOLING:
            for pooling in ("global", "batch"):
                run = _cosine_run(name, pooling, feat[sl], target[sl])
                for grad in run["param_grads"].values():
                    dist.all_reduce(grad)
                results[f"{name}-{pooling}"] = run
        # every head inside a DDP model, two optimiser steps through supervise
        images, labels = _images()
        for name in HEADS:
            model = torch.nn.parallel.DistributedDataParallel(_model(name), find_unused_parameters=False)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(2):
                with ah.supervise(model, labels[sl]) as sup:
                    logits = model(images[sl])["out"]
                    loss = F.cross_entropy(logits, labels[sl], ignore_index=255) + sup.loss()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            # parameters and the head's persistent buffers (plain BatchNorm keeps each rank's last running
            # statistics: DDP broadcasts buffers at the start of a forward, not after it; ProtoSeg's usage counts
            # are a per-rank diagnostic)
            inner = model.module
            state = {k: v.detach().clone() for k, v in inner.named_parameters()}
            state.update({f"classifier.4.{k}": v.clone() for k, v in inner.classifier[4].state_dict().items()})
            results[f"ddp-{name}"] = state
        torch.save(results, os.path.join(out_dir, f"r{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: about 1 run in 50 a C++ worker thread is still joinable when the process exits
    # ("terminate called without an active exception", SIGABRT) after both ranks wrote their results.
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"r{r}.pt", weights_only=False) for r in range(WORLD)]


def test_protoseg_update_equals_concatenated_batch(ranks):
    r0, r1 = ranks[0]["proto"], ranks[1]["proto"]
    assert torch.equal(r0["prototypes"], r1["prototypes"])
    feat, target = _inputs()
    single = _proto_head()
    before = single.prototypes.clone()
    out = single(feat, target)
    torch.testing.assert_close(r0["prototypes"], single.prototypes, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat([r0["target"], r1["target"]]), out.proto_target)
    # class 3 exists only on rank 0, yet rank 1 moved it by the full step
    assert not torch.allclose(r1["prototypes"][3], before[3])


@pytest.mark.parametrize("name", list(HEADS))
def test_ddp_training_keeps_every_rank_identical(ranks, name):
    a, b = ranks[0][f"ddp-{name}"], ranks[1][f"ddp-{name}"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    fresh = _model(name).state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a)  # it did train
    if name == "proto":
        assert "classifier.4.prototypes" in a


@pytest.mark.parametrize("name", list(POOLING))
def test_global_label_pooling_equals_one_process_on_the_global_batch(ranks, name):
    feat, target = _inputs()
    head = _cosine_head(name, "batch")  # one process: its batch is the global batch
    x = feat.clone().requires_grad_(True)
    out = head(x, target)
    loss_fn = head.default_loss()
    halves = [slice(0, 2), slice(2, 4)]
    per_rank_terms = [loss_fn.terms(_slice_output(out, sl, 4), target[sl]) for sl in halves]
    sum(sum(t.values()) for t in per_rank_terms).backward()  # Σ_ranks of each rank's loss
    label_built = out.teacher
    for rank, sl in enumerate(halves):
        got = ranks[rank][f"{name}-global"]
        torch.testing.assert_close(got["logits"], out.logits[sl].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["label_built"], label_built[sl].detach(), rtol=1e-5, atol=1e-5)
        for key, value in per_rank_terms[rank].items():
            torch.testing.assert_close(got["terms"][key], value.detach(), rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(got["feat_grad"], x.grad[sl], rtol=1e-5, atol=1e-5)
    grads = ranks[0][f"{name}-global"]["param_grads"]  # all-reduced over the ranks
    for key, p in head.named_parameters():
        torch.testing.assert_close(grads[key], p.grad, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", list(POOLING))
def test_batch_label_pooling_is_per_rank_as_the_official_code(ranks, name):
    feat, target = _inputs()
    for rank, sl in enumerate([slice(0, 2), slice(2, 4)]):
        alone = _cosine_run(name, "batch", feat[sl], target[sl])
        got = ranks[rank][f"{name}-batch"]
        torch.testing.assert_close(got["label_built"], alone["label_built"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["feat_grad"], alone["feat_grad"], rtol=1e-6, atol=1e-6)
    global_oracle = ranks[0][f"{name}-global"]["label_built"]
    assert not torch.allclose(ranks[0][f"{name}-batch"]["label_built"], global_oracle)  # the two modes differ


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm trains on GPUs only (NCCL, 2 devices)")
def test_sync_batchnorm_model_with_global_pooling(tmp_path):  # pragma: no cover - needs 2 GPUs
    mp.spawn(_syncbn_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    a, b = (torch.load(tmp_path / f"sbn{r}.pt") for r in range(WORLD))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _syncbn_worker(rank: int, init_file: str, out_dir: str) -> None:  # pragma: no cover - needs 2 GPUs
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.cuda.set_device(rank)
        images, labels = (t.cuda() for t in _images())
        sl = slice(rank * 2, rank * 2 + 2)
        states = {}
        for name in POOLING:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_model(name)).cuda()
            setattr(model.classifier[4], POOLING[name], "global")
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(2):
                with ah.supervise(model, labels[sl]) as sup:
                    loss = F.cross_entropy(model(images[sl])["out"], labels[sl], ignore_index=255) + sup.loss()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            states.update({f"{name}.{k}": v.cpu() for k, v in model.module.state_dict().items()})
        torch.save(states, os.path.join(out_dir, f"sbn{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)
