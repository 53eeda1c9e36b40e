"""The expert pool: mixed-adapter batches, posterior-weighted mixtures, refusal of bad adapters."""

from __future__ import annotations

import json

import pytest
import torch

from experts.adapters import Expansion, ExpertPool, check_adapter
from experts.errors import ArtifactError, UnknownExpertError


def make_adapter(app, directory, seed: int, **lora) -> None:
    """A real LoRA adapter with random (non-identity) weights, saved as safetensors; `lora`
    overrides LoraConfig fields (default r=4 on q_proj and v_proj)."""
    from peft import LoraConfig, get_peft_model

    from experts.base_model import load_base_model

    torch.manual_seed(seed)
    config = {"r": 4, "target_modules": ["q_proj", "v_proj"], **lora}
    model = get_peft_model(
        load_base_model(app.base_model, app.paths), LoraConfig(**config, init_lora_weights=False)
    )
    model.save_pretrained(directory)


def make_unloadable_adapter(app, directory, seed: int) -> None:
    """An adapter that passes `check_adapter` (a sound safetensors file of LoRA weights) but does
    not load: its A matrices have one row more than its config's rank."""
    from safetensors.torch import load_file, save_file

    make_adapter(app, directory, seed)
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: torch.cat([v, v[:1]]) if "lora_A" in k else v for k, v in tensors.items()}, path)


@pytest.fixture(scope="module")
def pool(tiny_app, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    pool = ExpertPool.load(tiny_app, names=[], device="cpu", precision="fp32")
    for i, name in enumerate(["legal", "biomedical"]):
        make_adapter(tiny_app, root / name, seed=i)
        pool.add(name, root / name)
    return pool


def test_expansion_normalises_weights_and_mixes_probabilities():
    exp = Expansion.of([{"a": 3.0, "b": 1.0}, {"c": 2.0}])
    assert exp.owner == [0, 0, 1] and exp.n == 2
    torch.testing.assert_close(exp.log_weights.exp(), torch.tensor([0.75, 0.25, 1.0]))
    logits = torch.randn(3, 5, 11)
    mixed = exp.mix(logits)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(mixed[0].exp(), 0.75 * p[0] + 0.25 * p[1])
    torch.testing.assert_close(mixed[1].exp(), p[2])
    with pytest.raises(ValueError, match="must be positive"):
        Expansion.of([{}])


def test_context_mixture_is_bayes_rule_over_the_tokens_so_far():
    """Weights at position t = prior x likelihood of tokens 1..t, renormalised (a plain loop)."""
    torch.manual_seed(0)
    exp = Expansion.of([{"a": 3.0, "b": 1.0}, {"c": 2.0}])
    logits = torch.randn(3, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0  # a padding column adds no evidence
    mixed = exp.mix_context(logits, ids, mask)
    p = torch.softmax(logits, -1)
    w = torch.tensor([0.75, 0.25])
    for t in range(6):
        expected = w[0] * p[0, t] + w[1] * p[1, t]
        torch.testing.assert_close(mixed[0, t].exp(), expected)
        if t + 1 < 6 and mask[0, t + 1]:
            w = w * p[[0, 1], t, ids[0, t + 1]]
            w = w / w.sum()
    torch.testing.assert_close(mixed[1], torch.log_softmax(logits[2], -1))  # one component: itself
    # Evidence moves the weight to the component that predicts the text better.
    sharp = torch.full((3, 6, 11), -5.0)
    sharp[0, torch.arange(5), ids[0, 1:]] = 5.0  # component "a" predicts every next token
    late = exp.mix_context(sharp, ids, torch.ones_like(ids))[0, -2].exp()  # after 4 tokens of evidence
    torch.testing.assert_close(late, torch.softmax(sharp[0, -2], -1), atol=1e-3, rtol=0)
    assert not torch.allclose(exp.mix(sharp)[0, -2].exp(), late, atol=1e-2)  # the prior alone: 0.75 / 0.25


def test_mixed_adapter_batch_equals_separate_passes(pool):
    ids = torch.randint(0, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mixed = pool.forward(ids, mask, ["legal", "biomedical", "base"]).logits
    for row, name in enumerate(["legal", "biomedical", "base"]):
        alone = pool.forward(ids[row : row + 1], mask[row : row + 1], [name]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-4, atol=1e-4)
    # the adapters really change the output (init_lora_weights=False), else the test proves nothing
    assert not torch.allclose(mixed[0], pool.forward(ids[:1], mask[:1], ["base"]).logits[0], atol=1e-3)


def test_mixture_of_one_expert_is_that_expert(pool):
    ids = torch.randint(0, 1000, (2, 10))
    mask = torch.ones_like(ids)
    single = pool.mixture_logprobs(ids, mask, [{"legal": 1.0}, {"biomedical": 1.0}])
    direct = torch.log_softmax(pool.forward(ids, mask, ["legal", "biomedical"]).logits.float(), -1)
    torch.testing.assert_close(single, direct, rtol=1e-4, atol=1e-4)
    mixed = pool.mixture_logprobs(ids[:1], mask[:1], [{"legal": 0.5, "biomedical": 0.5}])
    torch.testing.assert_close(
        mixed.exp(),
        0.5 * (direct[0:1].exp() + direct[1:2].exp()) * 0
        + 0.5
        * (
            torch.softmax(pool.forward(ids[:1], mask[:1], ["legal"]).logits.float(), -1)
            + torch.softmax(pool.forward(ids[:1], mask[:1], ["biomedical"]).logits.float(), -1)
        ),
        rtol=1e-4,
        atol=1e-5,
    )


def test_unknown_adapter_name_is_refused(pool):
    with pytest.raises(UnknownExpertError, match="available"):
        pool.mixture_logprobs(
            torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), [{"lgal": 1}]
        )


def test_remove_then_add_back(pool, tmp_path, tiny_app):
    make_adapter(tiny_app, tmp_path / "tmp_expert", seed=7)
    pool.add("tmp_expert", tmp_path / "tmp_expert")
    assert "tmp_expert" in pool.names()
    pool.remove("tmp_expert")
    assert "tmp_expert" not in pool.names()
    with pytest.raises(UnknownExpertError):
        pool.remove("tmp_expert")


def test_check_adapter_refuses_missing_pickled_and_corrupt(tmp_path):
    with pytest.raises(ArtifactError, match="expert 'x': missing .*adapter_config.json"):
        check_adapter("x", tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ArtifactError, match="pickled .bin adapters are refused"):
        check_adapter("x", tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        check_adapter("x", tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ArtifactError, match="only LoRA"):
        check_adapter("x", tmp_path)


def test_corrupt_safetensors_fails_naming_expert(pool, tmp_path, tiny_app):
    make_adapter(tiny_app, tmp_path / "bad", seed=3)
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="expert 'bad'"):
        pool.add("bad", tmp_path / "bad")
    assert "bad" not in pool.names()


@pytest.mark.parametrize("broken", ["garbage", "unloadable"])
def test_a_replacement_that_fails_to_load_leaves_the_old_version_serving(tiny_app, tmp_path, broken):
    pool = ExpertPool.load(tiny_app, names=[], device="cpu", precision="fp32")
    make_adapter(tiny_app, tmp_path / "v1", seed=0)
    pool.add("legal", tmp_path / "v1")
    ids = torch.randint(0, 1000, (1, 9))
    mask = torch.ones_like(ids)
    before = pool.forward(ids, mask, ["legal"]).logits
    peft_names, revision = set(pool.model.peft_config), pool.revision
    if broken == "garbage":  # refused by check_adapter, before peft sees it
        make_adapter(tiny_app, tmp_path / "v2", seed=1)
        (tmp_path / "v2" / "adapter_model.safetensors").write_bytes(b"garbage")
    else:  # refused by peft while it loads beside v1
        make_unloadable_adapter(tiny_app, tmp_path / "v2", seed=1)
    with pytest.raises(ArtifactError, match="expert 'legal'"):
        pool.add("legal", tmp_path / "v2")
    assert pool.adapters["legal"] == tmp_path / "v1"
    assert set(pool.model.peft_config) == peft_names and pool.revision == revision  # nothing half-loaded
    torch.testing.assert_close(pool.forward(ids, mask, ["legal"]).logits, before, rtol=0, atol=0)
    # a sound replacement takes over, in place of the old version (not beside it)
    make_adapter(tiny_app, tmp_path / "v3", seed=2)
    pool.add("legal", tmp_path / "v3")
    assert len(pool.model.peft_config) == 1 and pool.peft_names.keys() == {"legal"}
    after = pool.forward(ids, mask, ["legal"]).logits
    assert not torch.allclose(after, before, atol=1e-4)
    fresh = ExpertPool.load(tiny_app, names=[], device="cpu", precision="fp32")
    fresh.add("legal", tmp_path / "v3")
    torch.testing.assert_close(after, fresh.forward(ids, mask, ["legal"]).logits)


def test_a_dora_adapter_is_refused_naming_it(pool, tiny_app, tmp_path):
    make_adapter(tiny_app, tmp_path / "dora", seed=5, use_dora=True)
    with pytest.raises(ArtifactError, match="expert 'dora': .* DoRA adapter"):
        pool.add("dora", tmp_path / "dora")
    assert "dora" not in pool.names()
