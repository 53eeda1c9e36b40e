"""GPU paths: training and the mixed-adapter pool on CUDA in bf16 (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from experts.adapters import ExpertPool
from experts.base_model import pick_device, pick_dtype

pytestmark = pytest.mark.gpu


def test_auto_device_and_precision_pick_cuda_bf16():
    assert pick_device("auto") == "cuda"
    assert pick_dtype("auto", "cuda") == torch.bfloat16


def test_train_on_cuda_matches_cpu_loss_direction(tiny_app, artifacts, tmp_path):
    from dataclasses import replace

    from experts.config import compose
    from experts.schema import TrainSpec, build
    from experts.train import train_expert
    from tests.experts.test_train import write_corpus

    app = compose(["base_model=tiny", "train=tiny", "expert=biomedical"])
    write_corpus(app, "biomedical")
    gpu = replace(app, train=build(TrainSpec, {**app.train.__dict__, "device": "cuda", "precision": "bf16"}))
    metrics = train_expert(gpu, gpu.expert, tmp_path / "gpu", progress=False)
    assert metrics["device"] == "cuda" and metrics["dtype"] == "bfloat16"
    assert metrics["test_perplexity"]["expert"] < metrics["test_perplexity"]["base"]


def test_pool_mixed_batch_on_cuda(tiny_app):
    pool = ExpertPool.load(tiny_app, names=[], device="cuda", precision="auto")
    ids = torch.randint(0, 1000, (2, 8))
    out = pool.forward(ids, torch.ones_like(ids), ["base", "base"])
    assert out.logits.device.type == "cuda"
    torch.testing.assert_close(
        out.logits[0].float().cpu(),
        pool.forward(ids[:1], torch.ones_like(ids[:1]), ["base"]).logits[0].float().cpu(),
        rtol=2e-2,
        atol=2e-2,
    )
