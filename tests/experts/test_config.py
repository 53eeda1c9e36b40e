"""Every YAML in conf/ composes and validates against its schema, without loading weights."""

from __future__ import annotations

import dataclasses

import pytest

from experts.config import (
    ExpertSpec,
    LoraSpec,
    TrainSpec,
    build,
    compose,
    config_dir,
    expert_files,
    load_expert_file,
    to_app_config,
)
from experts.errors import ConfigError

CONF = config_dir()
GROUPS = {
    g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("base_model", "train", "router", "serve")
}
# base_model/local and /hub need a path or id the user supplies.
FILL = {
    ("base_model", "local"): ["base_model.path=/nonexistent"],
    ("base_model", "hub"): ["base_model.hub_id=org/model"],
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    app = compose([f"{group}={option}", *FILL.get((group, option), [])])
    assert {e.name for e in app.experts} >= {
        "biomedical",
        "legal",
        "python_docs",
        "unix_man",
        "religion",
        "politics",
    }


@pytest.mark.parametrize("slug", sorted(expert_files()))
def test_every_expert_file_validates_and_overrides_apply(slug):
    spec = load_expert_file(expert_files()[slug])
    assert spec.name == slug
    app = compose([f"expert={slug}", "lora.r=4", "train.lr=0.001"])
    assert app.expert == spec
    # command-line overrides beat both the profile and the expert file
    assert app.lora.r == 4 and app.train.lr == 0.001


def test_six_default_experts_are_routable():
    app = compose()
    routable = sorted(e.name for e in app.experts if e.routable)
    assert routable == ["biomedical", "legal", "politics", "python_docs", "religion", "unix_man"]


def test_unknown_key_fails_loudly_naming_it():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rank'\] in lora"):
        build(LoraSpec, {"rank": 8}, where="lora")


def test_wrong_type_and_range_are_named():
    with pytest.raises(ConfigError, match="train.steps"):
        build(TrainSpec, {"steps": "many"}, where="train")
    with pytest.raises(ConfigError, match="lora.r 0 must be > 0"):
        build(LoraSpec, {"r": 0}, where="lora")


def test_bad_slug_and_reserved_names_rejected():
    data = {"name": "Legal-Stuff", "description": "x", "data": {"source": "folder", "path": "/tmp"}}
    with pytest.raises(ConfigError, match="not a slug"):
        build(ExpertSpec, data)
    with pytest.raises(ConfigError, match="reserved"):
        build(ExpertSpec, {**data, "name": "auto"})


def test_expert_file_name_must_match_slug(tmp_path):
    (tmp_path / "expert").mkdir()
    (tmp_path / "config.yaml").write_text("{}")
    bad = tmp_path / "expert" / "mine.yaml"
    bad.write_text("expert:\n  name: other\n  description: d\n  data: {source: folder, path: /x}\n")
    with pytest.raises(ConfigError, match="does not match its file name"):
        load_expert_file(bad)


def test_experts_subset_and_unknown_subset():
    app = compose(["experts=[legal,biomedical]"])
    assert sorted(app.expert_names()) == ["biomedical", "legal"]
    with pytest.raises(ConfigError, match="unknown expert"):
        compose(["experts=[legal,lgal]"])


def test_typed_config_is_frozen():
    app = compose()
    with pytest.raises(dataclasses.FrozenInstanceError):
        app.train.steps = 1  # type: ignore[misc]
    assert to_app_config  # the single entry point used by the CLI
