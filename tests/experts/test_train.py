"""LoRA training on the tiny base model: outputs, resume after interruption, instruction masking."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from experts.config import build, compose
from experts.train import train_expert
from experts.train_data import instruction_rows

WORDS = [
    "the",
    "cell",
    "protein",
    "gene",
    "patient",
    "dose",
    "trial",
    "result",
    "acid",
    "enzyme",
    "blood",
    "tumour",
    "kinase",
    "receptor",
]


def write_corpus(app, slug: str, seed: int = 0, docs: int = 56) -> None:
    """A small corpus built by the real pipeline from a folder of text files (source: folder)."""
    from dataclasses import replace

    from experts.config import DataSpec
    from experts.data import build_corpus

    rng = random.Random(seed)
    folder = app.paths.artifacts_dir / "raw" / slug
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        text = " ".join(rng.choice(WORDS) for _ in range(150)) + "."
        (folder / f"doc{i}.txt").write_text(text)
    spec = replace(
        app.get_expert(slug), data=DataSpec(source="folder", path=str(folder), split=(0.7, 0.15, 0.15))
    )
    build_corpus(spec, app)


@pytest.fixture()
def tiny(tiny_app, artifacts):
    app = compose(["base_model=tiny", "train=tiny", "expert=biomedical"])
    write_corpus(app, "biomedical")
    return app


def adapter_tensors(directory):
    return load_file(str(directory / "adapter_model.safetensors"))


def test_train_writes_peft_adapter_metrics_and_card(tiny):
    out = tiny.paths.expert_dir("biomedical")
    metrics = train_expert(tiny, tiny.expert, out, progress=False)
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == tiny.lora.r
    assert sorted(config["target_modules"]) == sorted(tiny.lora.target_modules)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == tiny.train.steps == len(saved["history"]["train_loss"])
    assert [v[0] for v in saved["history"]["val"]] == [2, 4]
    assert saved["test_perplexity"]["base"] > 1 and saved["test_perplexity"]["expert"] > 1
    # a repetitive 14-word vocabulary is easy: even 4 steps at lr 1e-3 must lower perplexity
    assert metrics["test_perplexity"]["expert"] < metrics["test_perplexity"]["base"]
    assert "biomedical" in (out / "README.md").read_text()
    assert not (out / "checkpoint").exists() and not (out / "adapter.part").exists()
    assert not list(out.glob("*.bin")), "adapters are saved as safetensors only"


def test_resume_after_interruption_reproduces_uninterrupted_run(tiny, monkeypatch, tmp_path):
    reference = train_expert(tiny, tiny.expert, tmp_path / "ref", progress=False)
    calls = {"n": 0}
    real_clip = torch.nn.utils.clip_grad_norm_

    def interrupt_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupt_third_step)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_expert(tiny, tiny.expert, out, progress=False)
    assert (out / "checkpoint" / "state.json").exists()
    assert not (out / "adapter_model.safetensors").exists()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    resumed = train_expert(tiny, tiny.expert, out, progress=False)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    a, b = adapter_tensors(tmp_path / "ref"), adapter_tensors(out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert resumed["test_perplexity"] == pytest.approx(reference["test_perplexity"], rel=1e-4)


def test_instruction_rows_mask_the_prompt(tiny_app):
    from experts.base_model import load_tokenizer

    tok = load_tokenizer(tiny_app.base_model, tiny_app.paths)
    ids, labels, mask = instruction_rows(
        [{"prompt": "What is a kinase?", "response": "An enzyme."}], tok, 64, "sys"
    )
    n_resp = len(tok("An enzyme.", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert int((labels != -100).sum()) == n_resp
    kept = labels[0][labels[0] != -100].tolist()
    assert kept[-1] == tok.eos_token_id and tok.decode(kept[:-1]) == "An enzyme."
    real = int((labels[0] != -100).nonzero().max()) + 1  # the response's EOS is the last real token
    assert mask[0][:real].all() and not mask[0][real:].any()  # attends to exactly the real tokens


def test_generalist_mixes_every_routable_corpus(tiny_app, artifacts):
    app = compose(["base_model=tiny", "train=tiny", "expert=generalist", "experts=[biomedical,legal]"])
    for i, slug in enumerate(["biomedical", "legal"]):
        write_corpus(app, slug, seed=i)
    from experts.base_model import load_tokenizer
    from experts.train_data import build_train_data

    data = build_train_data(app, app.expert, load_tokenizer(app.base_model, app.paths))
    assert set(data.sources) == {"biomedical", "legal"}
    assert data.sources["biomedical"] == data.sources["legal"]


def test_target_modules_that_do_not_exist_fail_clearly(tiny):
    from dataclasses import replace

    from experts.config import LoraSpec
    from experts.errors import MoeError

    bad = replace(tiny, lora=build(LoraSpec, {"target_modules": ["nonexistent_proj"]}))
    with pytest.raises(MoeError, match="target_modules"):
        train_expert(bad, tiny.expert, tiny.paths.expert_dir("x"), progress=False)
    assert not (tiny.paths.expert_dir("x") / "adapter_model.safetensors").exists()  # failed before writing


def test_time_budget_stops_training_and_saves_a_loadable_adapter(tiny_app, artifacts):
    """A fake clock that advances 10 s a reading makes the 0.5 min budget deterministic."""
    from experts.adapters import ExpertPool
    from experts.base_model import load_tokenizer
    from experts.evaluate import block_nll, perplexity
    from experts.train_data import domain_blocks

    app = compose(
        ["base_model=tiny", "train=tiny", "expert=biomedical", "train.steps=8", "train.max_minutes=0.5"]
    )
    write_corpus(app, "biomedical")
    readings = iter(range(0, 10_000, 10))
    out = app.paths.expert_dir("biomedical")
    metrics = train_expert(app, app.expert, out, progress=False, clock=lambda: float(next(readings)))
    # start 0 s; after step 1 (10 s) two more steps fit in 30 s, after step 3 (30 s) none
    assert metrics["steps"] == 3 and metrics["planned_steps"] == 8
    assert metrics["stopped_by_budget"] and not metrics["stopped_early"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 3 and saved["stopped_by_budget"] and saved["max_minutes"] == 0.5
    assert [v[0] for v in saved["history"]["val"]] == [2, 3]  # validated where it stopped
    assert len(saved["history"]["train_loss"]) == 3
    assert not (out / "checkpoint").exists()

    pool = ExpertPool.load(app, ["biomedical"], device="cpu", precision="fp32")
    tok = load_tokenizer(app.base_model, app.paths)
    blocks = domain_blocks("biomedical", app, tok, "test", app.train.test_batches * app.train.batch_size)

    def ppl(name):
        fwd = lambda ids, mask, rows: pool.forward(ids, mask, [name] * len(ids)).logits  # noqa: E731
        return perplexity(block_nll(fwd, blocks, app.train.batch_size))

    # the adapter on disk is the one that was evaluated, and it is not the base model
    assert ppl("biomedical") == pytest.approx(metrics["test_perplexity"]["expert"], rel=1e-3)
    assert ppl("biomedical") < ppl("base")


def test_budget_plan_counts_the_steps_that_still_fit():
    from experts.train import steps_that_fit

    assert steps_that_fit(step=2, done_this_run=2, elapsed=20.0, budget_s=100.0, steps=30) == 10
    assert steps_that_fit(step=2, done_this_run=2, elapsed=20.0, budget_s=1000.0, steps=30) == 30
    assert steps_that_fit(step=5, done_this_run=5, elapsed=59.0, budget_s=60.0, steps=30) == 5
    # over budget already (e.g. a slow validation): stop here, never before the current step
    assert steps_that_fit(step=5, done_this_run=1, elapsed=90.0, budget_s=60.0, steps=30) == 5


def test_base_perplexity_is_computed_once_per_set_of_blocks(tiny, tmp_path):
    first = train_expert(tiny, tiny.expert, tmp_path / "a", progress=False)
    assert not first["base_perplexity_cached"]
    cached = list((tiny.paths.artifacts_dir / "cache" / "base_perplexity").glob("*.json"))
    assert len(cached) == 1
    # a second expert trained on the same blocks reads the figure instead of computing it
    cached[0].write_text(json.dumps({"perplexity": 12345.0}))
    second = train_expert(tiny, tiny.expert, tmp_path / "b", progress=False)
    assert second["base_perplexity_cached"] and second["test_perplexity"]["base"] == 12345.0
    # other blocks (fewer test batches) are another key: computed, and equal to the first run's
    fewer = compose(["base_model=tiny", "train=tiny", "expert=biomedical", "train.test_batches=1"])
    third = train_expert(fewer, fewer.expert, tmp_path / "c", progress=False)
    assert not third["base_perplexity_cached"] and third["test_perplexity"]["base"] != 12345.0
