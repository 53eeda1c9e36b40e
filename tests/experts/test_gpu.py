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

    from experts.config import TrainSpec, build, compose
    from experts.train import train_expert
    from tests.experts.test_train import write_corpus

    app = compose(["base_model=tiny", "train=tiny", "expert=biomedical"])
    write_corpus(app, "biomedical")
    gpu = replace(app, train=build(TrainSpec, {**app.train.__dict__, "device": "cuda", "precision": "bf16"}))
    metrics = train_expert(gpu, gpu.expert, tmp_path / "gpu", progress=False)
    assert metrics["device"] == "cuda" and metrics["dtype"] == "bfloat16"
    assert metrics["test_perplexity"]["expert"] < metrics["test_perplexity"]["base"]


def test_pool_mixed_batch_on_cuda(tiny_app, tmp_path):
    """One batch, three rows on different adapters (base and two experts): each row's logits are
    what that adapter gives alone, and the adapters do change them."""
    from tests.experts.test_adapters import make_adapter

    pool = ExpertPool.load(tiny_app, names=[], device="cuda", precision="auto")
    for seed, name in enumerate(("legal", "python_docs")):
        make_adapter(tiny_app, tmp_path / name, seed)
        pool.add(name, tmp_path / name)
    ids = torch.randint(0, 1000, (3, 8))
    rows = ["base", "legal", "python_docs"]
    out = pool.forward(ids, torch.ones_like(ids), rows)
    assert out.logits.device.type == "cuda"
    alone = [
        pool.forward(ids[i : i + 1], torch.ones_like(ids[:1]), [name]).logits[0]
        for i, name in enumerate(rows)
    ]
    for i in range(3):
        torch.testing.assert_close(out.logits[i].float().cpu(), alone[i].float().cpu(), rtol=2e-2, atol=2e-2)
    base_of_row1 = pool.forward(ids[1:2], torch.ones_like(ids[:1]), ["base"]).logits[0]
    assert not torch.allclose(alone[1].float(), base_of_row1.float(), atol=1e-3)  # legal's adapter acted
