"""Compose Hydra config and turn it into the typed `AppConfig`.

The dataclass defaults are the defaults: `register_defaults` hands them to Hydra as the config
`moe_defaults`, first in `conf/config.yaml`'s defaults list, so every YAML file holds only what
differs and a command-line override finds every key. Each expert is one file `conf/expert/<slug>.yaml`
(package `_global_`: its `expert:` node plus optional `lora:`/`train:` overrides, so command-line
overrides still win). The registry of experts is every file in `conf/expert/`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experts.config.app import AppConfig
from experts.config.expert import ExpertSpec
from experts.config.validate import build
from experts.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULTS_NAME = "moe_defaults"  # the name conf/config.yaml's defaults list gives the dataclass defaults
# Top-level keys of conf/config.yaml that are not AppConfig fields: they steer a command.
COMMAND_KEYS = ("all_experts",)


def schema_defaults() -> dict[str, Any]:
    """The defaults of every AppConfig group that has them all, as plain data (lists, mappings)."""
    hints = typing.get_type_hints(AppConfig)
    groups = {}
    for f in dataclasses.fields(AppConfig):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and all(
            g.default is not dataclasses.MISSING or g.default_factory is not dataclasses.MISSING
            for g in dataclasses.fields(tp)
        ):
            groups[f.name] = _plain(dataclasses.asdict(tp()))  # type: ignore[operator]
    return groups


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def register_defaults() -> None:
    """Give Hydra the dataclass defaults as the config `moe_defaults` (before it composes)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=DEFAULTS_NAME, node=schema_defaults())


def config_dir() -> Path:
    """The conf/ folder: $MOE_CONFIG_DIR, else the one beside the installed packages."""
    path = Path(os.environ.get("MOE_CONFIG_DIR", REPO_ROOT / "conf")).expanduser().resolve()
    if not (path / "config.yaml").exists():
        raise ConfigError(f"no config.yaml in {path}; set MOE_CONFIG_DIR to your conf/ folder")
    return path


def expert_files(conf: Path | None = None) -> dict[str, Path]:
    """slug -> file, for every conf/expert/*.yaml."""
    folder = (conf or config_dir()) / "expert"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_expert_file(path: Path) -> ExpertSpec:
    """Read one expert file and validate its `expert:` node; the slug must match the file name."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # yaml errors, interpolation errors
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict) or "expert" not in raw:
        raise ConfigError(f"{path} must have a top-level `expert:` mapping (and `# @package _global_`)")
    allowed = {"expert", "lora", "train", "defaults"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise ConfigError(f"unknown top-level key(s) {extra} in {path}; allowed: {sorted(allowed)}")
    spec = build(ExpertSpec, raw["expert"], where=f"{path.name}:expert")
    if spec.name != path.name.split(".")[0]:  # <slug>.yaml, or a draft <slug>.yaml.proposed
        raise ConfigError(
            f"expert name {spec.name!r} does not match its file name {path.name!r}; "
            f"rename one so both say the same slug"
        )
    return spec


def to_app_config(cfg: DictConfig | dict[str, Any], conf: Path | None = None) -> AppConfig:
    """Validate a composed config and return typed objects (the only place DictConfig is read)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(data, dict)
    data = {k: v for k, v in data.items() if k != "hydra"}
    enabled = data.pop("experts", None)  # null = every file in conf/expert
    for key in COMMAND_KEYS:
        data.pop(key, None)
    files = expert_files(conf)
    if enabled is not None:
        unknown = sorted(set(enabled) - set(files))
        if unknown:
            raise ConfigError(f"experts lists unknown expert(s) {unknown}; available: {sorted(files)}")
        files = {k: v for k, v in files.items() if k in enabled}
    specs = tuple(load_expert_file(p) for p in files.values())
    selected = data.pop("expert", None)
    data["experts"] = ()
    data["expert"] = None
    app = build(AppConfig, data, where="config")
    chosen = build(ExpertSpec, selected, where="expert") if selected else None
    if chosen is not None and chosen.name not in {s.name for s in specs}:
        specs = (*specs, chosen)  # e.g. the generalist, which is not part of the routed set
    return AppConfig(**{**app.__dict__, "experts": specs, "expert": chosen})


def compose(overrides: list[str] | None = None) -> AppConfig:
    """Compose config from conf/ with Hydra's compose API (library use, notebooks, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = config_dir()
    register_defaults()
    if GlobalHydra.instance().is_initialized():
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    else:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return to_app_config(cfg, conf)
