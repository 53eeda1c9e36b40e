"""Every YAML in conf/ composes and validates against its schema, without loading weights."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from experts.config import (
    AppConfig,
    ExpertSpec,
    LoraSpec,
    ProposalSpec,
    ResourceSpec,
    RouterSpec,
    ServeSpec,
    TrainSpec,
    build,
    compose,
    config_dir,
    expert_files,
    load_expert_file,
    to_app_config,
)
from experts.config.validate import coerce
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


# Keys a YAML file may hold although no dataclass default stands behind them: Hydra reads them.
HYDRA_KEYS = {
    "defaults",  # Hydra's defaults list (the groups and their order)
    "hydra",  # Hydra's own settings (run and sweep folders)
    "experts",  # config.yaml: must exist for `experts=[a,b]` to override it without `+`; read by to_app_config
    "all_experts",  # config.yaml: set by `expert=all`, steers the CLI; not an AppConfig field
}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _restated(cls: type, data: dict, defaults: Any, where: str) -> list[str]:
    """Keys of `data` whose value equals the default: `defaults` (an instance of `cls`, e.g. the pool's
    ResourceSpec inside ServeSpec) where there is one, else the class's field defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    found = []
    for key, value in data.items():
        if key in HYDRA_KEYS:
            continue
        assert key in fields, f"{where}.{key} is not a field of {cls.__name__}"
        default = getattr(defaults, key) if defaults is not None else _field_default(fields[key])
        tp = hints[key]
        inner = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if isinstance(value, dict) and dataclasses.is_dataclass(inner):
            sub = default if dataclasses.is_dataclass(default) else None
            found += _restated(inner, value, sub, f"{where}.{key}")  # type: ignore[arg-type]
        elif default is not dataclasses.MISSING and coerce(tp, value, f"{where}.{key}") == default:
            found.append(f"{where}.{key}: {value!r}")
    return found


def _yaml(path: Path) -> dict:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # interpolations stay text
    return data if isinstance(data, dict) else {}


def _conf_file(name: str) -> dict:
    """One file of conf/ as the top-level config it contributes (its Hydra package applied)."""
    path = CONF / name
    data = _yaml(path)
    if name == "config.yaml" or path.read_text().startswith("# @package _global_"):
        return data
    return {path.parent.name: data}


# conf/hydra/ holds the Optuna sweeper's own config (the plugin's schema, not ours): not walked.
CONF_FILES = sorted(
    p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml") if "hydra" not in p.parts[-3:-1]
)


def test_conf_walk_sees_every_group():
    assert {"config.yaml", "serve/gpu.yaml", "train/quick.yaml", "expert/legal.yaml"} <= set(CONF_FILES)
    assert all(f.count("/") <= 1 for f in CONF_FILES)


@pytest.mark.parametrize("name", CONF_FILES)
def test_no_yaml_key_restates_its_default(name):
    """Each default lives in the dataclasses; a YAML file holds only what differs (litgpt's deltas)."""
    assert _restated(AppConfig, _conf_file(name), None, name) == []


def test_restated_default_is_caught():
    """The walk above can fail: a key equal to its default, nested or not, is reported."""
    data = {"serve": {"max_batch_size": 32, "pool": {"num_cpus": 1.0, "num_gpus": 1.0}}, "lora": {"r": 8}}
    assert _restated(AppConfig, data, None, "x") == [
        "x.serve.max_batch_size: 32",
        "x.serve.pool.num_cpus: 1.0",
    ]
    expert = {
        "expert": {"name": "e", "data": {"source": "folder", "min_chars": 200, "split": [0.9, 0.05, 0.05]}}
    }
    assert _restated(AppConfig, expert, None, "x") == [
        "x.expert.data.min_chars: 200",
        "x.expert.data.split: [0.9, 0.05, 0.05]",
    ]


def test_the_default_options_are_the_dataclass_defaults():
    """`moe` with no overrides runs with exactly the dataclass defaults (train=quick, router=tuned, serve=local)."""
    app = compose()
    assert app.train == TrainSpec() and app.lora == LoraSpec()
    assert app.router == RouterSpec() and app.serve == ServeSpec() and app.proposals == ProposalSpec()


def test_a_partial_mapping_keeps_the_fields_own_defaults():
    """`serve.pool` given in part keeps the pool's defaults (not ResourceSpec's) for the rest."""
    serve = build(ServeSpec, {"pool": {"num_replicas": 2}}, where="serve")
    assert serve.pool == dataclasses.replace(ServeSpec().pool, num_replicas=2)
    assert serve.pool.num_cpus != ResourceSpec().num_cpus  # the two defaults differ, so this can fail
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['cpus'\] in serve.pool"):
        build(ServeSpec, {"pool": {"cpus": 2}}, where="serve")


def test_every_default_key_can_be_overridden_without_plus():
    """The defaults reach Hydra (moe_defaults), so a key no YAML file names is still overridable."""
    app = compose(["serve.pool.torch_threads=3", "router.finetune.max_steps=7", "proposals.top_terms=4"])
    assert (
        app.serve.pool.torch_threads == 3
        and app.router.finetune.max_steps == 7
        and app.proposals.top_terms == 4
    )
    assert app.serve.ingress == ServeSpec().ingress  # the rest keeps its defaults
