"""The typed config of every `moe` command, one module per thing it configures.

Hydra composes YAML from `conf/` (`compose.py`); `to_app_config` turns the result into the frozen
dataclasses below at the entry point, so no `DictConfig` travels between modules. The dataclass
defaults are the defaults; a YAML file holds only what differs from them. `AppConfig` composes the
expert, train, router and serve specs, so all of them live here, at the bottom of the layering
(experts <- router <- serving).
"""

from experts.config.app import AppConfig, PathsSpec
from experts.config.compose import (
    COMMAND_KEYS,
    REPO_ROOT,
    compose,
    config_dir,
    expert_files,
    load_expert_file,
    register_defaults,
    to_app_config,
)
from experts.config.expert import (
    RESERVED_SLUGS,
    SLUG_RE,
    BaseModelSpec,
    DataSpec,
    ExpertServingSpec,
    ExpertSpec,
    GenerationSpec,
    PackageRef,
    ResourceSpec,
    VllmSpec,
)
from experts.config.router import FineTuneSpec, RouterSpec
from experts.config.serve import ProposalSpec, ServeSpec
from experts.config.train import LoraSpec, TrainSpec
from experts.config.validate import build

__all__ = [
    "COMMAND_KEYS",
    "REPO_ROOT",
    "RESERVED_SLUGS",
    "SLUG_RE",
    "AppConfig",
    "BaseModelSpec",
    "DataSpec",
    "ExpertServingSpec",
    "ExpertSpec",
    "FineTuneSpec",
    "GenerationSpec",
    "LoraSpec",
    "PackageRef",
    "PathsSpec",
    "ProposalSpec",
    "ResourceSpec",
    "VllmSpec",
    "RouterSpec",
    "ServeSpec",
    "TrainSpec",
    "build",
    "compose",
    "config_dir",
    "expert_files",
    "load_expert_file",
    "register_defaults",
    "to_app_config",
]
