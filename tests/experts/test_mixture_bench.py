"""benchmarks/mixture_bench.py scores mixtures from each expert's log-probability of the observed
tokens; that arithmetic must equal what the pool's mixing (`Expansion`) does with full logits."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from experts.adapters import Expansion
from experts.config import REPO_ROOT

spec = importlib.util.spec_from_file_location("mixture_bench", REPO_ROOT / "benchmarks" / "mixture_bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture
def case():
    torch.manual_seed(0)
    experts, blocks, steps, vocab = 3, 2, 7, 11
    logits = torch.randn(experts, blocks, steps, vocab) * 3  # each expert's logits for each block
    ids = torch.randint(0, vocab, (blocks, steps))
    w = np.array([[0.6, 0.3, 0.1], [0.0, 0.8, 0.2]])
    logp = torch.log_softmax(logits, -1)
    picked = logp[:, :, :-1].gather(-1, ids[None, :, 1:, None].expand(experts, -1, -1, 1))[..., 0]
    components = [{str(j): float(row[j]) for j in range(experts) if row[j] > 0} for row in w]
    exp = Expansion.of(components)
    rows = torch.stack([logits[int(a), i] for i, a in zip(exp.owner, exp.adapters, strict=True)])
    return picked.numpy(), w, ids, exp, rows


def expected_nll(mixed_logp: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    return -mixed_logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].sum(-1).numpy()


def test_static_mixture_matches_the_pools_mixing(case):
    picked, w, ids, exp, rows = case
    want = expected_nll(exp.mix(rows), ids)
    np.testing.assert_allclose(bench.static_nll(picked, w), want, rtol=1e-5)


def test_context_mixture_matches_branch_train_merge_posterior(case):
    picked, w, ids, exp, rows = case
    want = expected_nll(exp.mix_context(rows, ids, torch.ones_like(ids)), ids)
    np.testing.assert_allclose(bench.context_nll(picked, w), want, rtol=1e-5)
    # and it differs from the static mixture (else the test could not tell them apart)
    assert not np.allclose(bench.static_nll(picked, w), want, rtol=1e-3)
