"""The whole resolved config of one command: every group composed into one `AppConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from experts.config.expert import BaseModelSpec, ExpertSpec
from experts.config.router import RouterSpec
from experts.config.serve import ProposalSpec, ServeSpec
from experts.config.train import LoraSpec, TrainSpec


@dataclass(frozen=True)
class PathsSpec:
    """Where things go. Relative paths are relative to the directory `moe` runs in."""

    artifacts: str = "artifacts"
    cache: str = "~/.cache/moe"  # downloads and the converted base model, shared between checkouts

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.artifacts).expanduser()

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache).expanduser()

    def data_dir(self, slug: str) -> Path:
        return self.artifacts_dir / "data" / slug

    def expert_dir(self, slug: str) -> Path:
        return self.artifacts_dir / "experts" / slug

    @property
    def router_dir(self) -> Path:
        return self.artifacts_dir / "router"

    @property
    def reports_dir(self) -> Path:
        return self.artifacts_dir / "reports"

    @property
    def downloads_dir(self) -> Path:
        return self.cache_dir / "downloads"

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"


@dataclass(frozen=True)
class AppConfig:
    """The whole resolved config of one `moe` command."""

    base_model: BaseModelSpec
    train: TrainSpec
    lora: LoraSpec
    router: RouterSpec
    serve: ServeSpec
    paths: PathsSpec
    experts: tuple[ExpertSpec, ...]  # every configured expert (conf/expert/*.yaml, minus disabled)
    expert: ExpertSpec | None = None  # the one a command acts on (expert=<slug>)
    proposals: ProposalSpec = field(default_factory=ProposalSpec)  # `moe propose-experts`

    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def get_expert(self, name: str) -> ExpertSpec:
        from experts.errors import UnknownExpertError

        for spec in self.experts:
            if spec.name == name:
                return spec
        raise UnknownExpertError(name, self.expert_names())
