"""Router mechanics on tiny synthetic data: decisions, policies, persistence, thread safety."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from experts.config import RouterSpec
from experts.errors import ArtifactError, ConfigError
from router.features import TfidfFeatures
from router.model import BACKGROUND, Router, RoutingDecision
from router.storage import META_FILE, WEIGHTS_FILE
from router.train import fit_router, purify_background

LABELS = ["biomedical", "legal", "python_docs"]  # the toy router's experts (conftest.py)
MED = "patient clinical dose tumour therapy trial"
LAW = "copyright licence warranty licensee sublicense"
OFF = "football weather recipe holiday concert"


def test_predict_proba_is_over_experts_only(toy_router):
    probs = toy_router.predict_proba([MED, LAW, OFF])
    assert probs.shape == (3, len(LABELS)) and toy_router.labels == LABELS
    assert [LABELS[i] for i in probs[:2].argmax(1)] == ["biomedical", "legal"]
    # The background mass is missing from the rows: off-topic text has little expert probability.
    assert probs[0].sum() > 0.9 and probs[2].sum() < 0.5
    assert toy_router.predict_proba([]).shape == (0, len(LABELS))


def test_fallback_policy_shapes(toy_router):
    med, off = toy_router.decide([MED, OFF], policy="fallback")
    assert med == RoutingDecision(
        "biomedical", {"biomedical": 1.0}, med.confidence, "routed", med.probabilities
    )
    assert set(med.probabilities) == set(LABELS) and BACKGROUND not in med.probabilities
    assert off.decision == "fallback" and off.expert == toy_router.fallback_model == "base"
    assert off.experts == {"base": 1.0}
    assert set(med.to_dict()) == {"expert", "experts", "confidence", "decision", "probabilities"}


def test_threshold_sends_low_confidence_to_fallback(toy_router, monkeypatch):
    monkeypatch.setattr(toy_router, "threshold", 0.999999)
    (decision,) = toy_router.decide([MED + " " + LAW], policy="fallback")
    assert decision.decision == "fallback" and decision.confidence < 0.999999


def test_top1_never_falls_back(toy_router):
    decisions = toy_router.decide([MED, OFF, "the of and"], policy="top1")
    assert [d.decision for d in decisions] == ["routed"] * 3
    assert all(d.expert in LABELS and d.experts == {d.expert: 1.0} for d in decisions)


def test_mixture_policy_mixes_two_close_experts(toy_router, monkeypatch):
    monkeypatch.setattr(toy_router, "mixture_min_prob", 0.1)
    mixed, single, off = toy_router.decide(["patient dose licence copyright", MED, OFF], policy="mixture")
    assert mixed.decision == "mixture" and set(mixed.experts) == {"biomedical", "legal"}
    assert sum(mixed.experts.values()) == pytest.approx(1.0, abs=1e-4)
    assert mixed.expert == max(mixed.experts, key=mixed.experts.get)
    assert single.decision == "routed" and single.experts == {"biomedical": 1.0}
    assert off.decision == "fallback"


def test_mixture_weights_are_the_mixture_policy_without_fallback(toy_router, monkeypatch):
    texts = ["patient dose licence", "football weather recipe holiday", "def import module"]
    monkeypatch.setattr(toy_router, "mixture_min_prob", 0.05)
    weights = toy_router.mixture_weights(texts)
    decisions = toy_router.decide(texts, policy="mixture")
    probs = toy_router.predict_proba(texts)
    assert decisions[1].decision == "fallback"  # background text: the policy falls back...
    for w, d, row in zip(weights, decisions, probs, strict=True):
        assert set(w) <= set(toy_router.labels)  # ...mixture_weights never does
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-5)
        assert max(w, key=w.get) == toy_router.labels[int(row.argmax())]
        if d.decision != "fallback":
            assert w == d.experts


def test_forced_decision():
    d = RoutingDecision.forced("legal", {"legal": 0.2, "biomedical": 0.7})
    assert (d.expert, d.experts, d.decision, d.confidence) == ("legal", {"legal": 1.0}, "forced", 0.2)


def test_unknown_policy_is_refused(toy_router):
    with pytest.raises(
        ConfigError, match=r"unknown router policy 'best'; allowed: \['top1', 'mixture', 'fallback'\]"
    ):
        toy_router.decide([MED], policy="best")


def test_save_load_round_trip_without_pickle(toy_router, tmp_path):
    toy_router.save(tmp_path / "router")
    files = sorted(p.name for p in (tmp_path / "router").iterdir())
    assert files == [META_FILE, WEIGHTS_FILE]
    meta = json.loads((tmp_path / "router" / META_FILE).read_text())
    assert meta["labels"] == LABELS and meta["pipeline"] == "tfidf" and meta["background"] is True
    assert meta["threshold"] == toy_router.threshold and "metrics" in meta["info"]
    loaded = Router.load(tmp_path / "router", expected_labels=list(reversed(LABELS)))
    texts = [MED, LAW, OFF, "import asyncio module"]
    np.testing.assert_allclose(loaded.predict_proba(texts), toy_router.predict_proba(texts), atol=1e-6)
    assert loaded.decide(texts) == toy_router.decide(texts)
    assert (loaded.threshold, loaded.temperature) == (toy_router.threshold, toy_router.temperature)


def test_load_refuses_other_experts(toy_router, tmp_path):
    toy_router.save(tmp_path / "router")
    with pytest.raises(ArtifactError) as err:
        Router.load(tmp_path / "router", expected_labels=["biomedical", "legal", "unix_man"])
    assert str(err.value) == (
        "router was trained for ['biomedical', 'legal', 'python_docs'] but config has "
        "['biomedical', 'legal', 'unix_man']; run `moe train-router`"
    )


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(ArtifactError, match="no trained router in .*; run `moe train-router`"):
        Router.load(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / META_FILE).write_text("{not json")
    (tmp_path / "bad" / WEIGHTS_FILE).write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="unreadable"):
        Router.load(tmp_path / "bad")
    (tmp_path / "bad" / META_FILE).write_text("{}")  # the metadata reads; the weights were cut short
    (tmp_path / "bad" / WEIGHTS_FILE).write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ArtifactError, match="unreadable"):
        Router.load(tmp_path / "bad")


def test_no_pickle_in_the_router_package():
    import router.model

    for path in Path(router.model.__file__).parent.glob("*.py"):
        source = path.read_text()
        for banned in ("import pickle", "import joblib", "from joblib", "cloudpickle", "torch.load"):
            assert banned not in source, f"{path.name} uses {banned}"


def test_concurrent_decide_matches_serial(toy_router):
    texts = [MED, LAW, OFF, "import asyncio module"] * 10
    serial = toy_router.decide(texts)
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda t: toy_router.decide([t])[0], texts))
    assert parallel == serial


def test_background_purification_drops_in_domain_looking_background():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.05]])
    y = np.array([0, 0, 1, 1, 1])  # class 1 = background; its last row looks like class 0
    assert purify_background(x, y, background=1).tolist() == [True, True, True, True, False]


def test_stricter_purification_drops_the_background_nearest_an_expert():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 0.9], [0.3, 0.7], [0.02, 0.98], [0.95, 0.05]])
    y = np.array([0, 1, 1, 1, 1, 1])  # class 1 = background
    plain = purify_background(x, y, background=1)
    strict = purify_background(x, y, background=1, extra=0.5)
    assert plain.tolist() == [True, True, True, True, True, False]
    # half of the four kept background rows go: the two nearest the expert ([0.3, 0.7], [0.1, 0.9])
    assert strict.tolist() == [True, True, False, False, True, False]


def test_fit_rejects_unknown_labels(toy_examples):
    with pytest.raises(ConfigError, match="not router labels"):
        fit_router(["legal"], toy_examples(5, 0), toy_examples(5, 1), RouterSpec(), TfidfFeatures())
