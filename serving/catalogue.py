"""What the endpoint serves, as one frozen object the ingress swaps whole on reload.

A `Catalogue` holds the config the experts came from, where each served model is placed, the
served experts' specs and adapter versions, the router and the retrieval indexes. A request reads
the ingress's catalogue once and uses that object throughout, so a reload (`reload_catalogue`,
then one assignment) never shows it half of the old experts and half of the new. Nothing in it is
mutated after `build_catalogue` returns; a reload builds a new one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from experts.adapters import BASE, adapter_dir, check_adapter
from experts.config import AppConfig, ExpertSpec, GenerationSpec
from experts.errors import ArtifactError, MoeError
from serving.api import AUTO
from serving.engine import adapter_version

if TYPE_CHECKING:
    from router.model import Router

log = logging.getLogger("serving")


def served_experts(app: AppConfig) -> tuple[list[str], dict[str, str]]:
    """Experts whose adapter is complete, and why the others are left out."""
    ok, missing = [], {}
    for spec in app.experts:
        try:
            check_adapter(spec.name, adapter_dir(spec, app.paths))
            ok.append(spec.name)
        except ArtifactError as exc:
            missing[spec.name] = str(exc)
    return ok, missing


def check_retrieval(app: AppConfig, served: Collection[str]) -> None:
    """Refuse to start when a served expert grounds its answers but its index was never built."""
    from experts.retrieval import index_dir

    for spec in app.experts:
        folder = index_dir(app.paths, spec.name)
        if spec.name in served and spec.serving.retrieval and not (folder / "vocabulary.json").exists():
            raise ArtifactError(
                f"expert {spec.name!r} has serving.retrieval: true but no retrieval index in {folder}; "
                f"build it with `moe index expert={spec.name}` (or set serving.retrieval: false)"
            )


@dataclass(frozen=True)
class Catalogue:
    """Everything a request needs to know about what is served (never mutated; see module doc)."""

    config: AppConfig
    placement: Mapping[str, str]  # served model name ("base" or a slug) -> pool deployment name
    specs: Mapping[str, ExpertSpec]  # the served experts
    sources: Mapping[str, tuple[str, float]]  # adapter folder and version of each served expert
    router: Router | None
    router_error: str  # why `router` is None ("" when it is loaded)
    retrievers: Mapping[str, Any]  # retrieval index of each served expert with serving.retrieval

    def models(self) -> list[str]:
        """The model names a request may ask for."""
        return [AUTO, BASE, *sorted(self.specs)]

    def generation(self, name: str) -> GenerationSpec:
        """The generation settings of a served expert (the defaults for `base`)."""
        spec = self.specs.get(name)
        return spec.generation if spec else GenerationSpec()


def build_catalogue(
    app: AppConfig,
    placement: Mapping[str, str],
    router: Router | None,
    router_error: str = "",
    previous: Catalogue | None = None,
) -> Catalogue:
    """The catalogue of `app`'s experts that `placement` places; reuses `previous`'s loaded indexes."""
    from experts.retrieval import load_index

    specs = {e.name: e for e in app.experts if e.name in placement}
    folders = {name: adapter_dir(spec, app.paths) for name, spec in specs.items()}
    have = previous.retrievers if previous is not None else {}
    return Catalogue(
        config=app,
        placement=dict(placement),
        specs=specs,
        sources={name: (str(folder), adapter_version(folder)) for name, folder in folders.items()},
        router=router,
        router_error=router_error,
        # Retrieval indexes of the experts that ground their answers (build_app checked they exist).
        retrievers={
            name: have.get(name) or load_index(app, name)
            for name, spec in specs.items()
            if spec.serving.retrieval
        },
    )


def load_router_or_reason(app: AppConfig) -> tuple[Router | None, str]:
    """The router, or None and why. A router trained for another set of experts (an expert file
    added or removed since) still routes among the experts it knows, with a warning: better than
    `auto` being down until `moe train-router` has run."""
    from router.model import load_router

    try:
        return load_router(app), ""
    except MoeError as exc:
        try:
            router = load_router(app, strict=False)
        except MoeError:  # the endpoint still serves named experts; `auto` answers 503
            log.error("router unavailable: %s", exc)
            return None, str(exc)
        log.warning("%s; routing among %s until `moe train-router` has run", exc, router.labels)
        return router, ""


def reload_catalogue(current: Catalogue, files_at_start: Collection[str]) -> tuple[Catalogue, dict[str, Any]]:
    """Re-read the expert files and the router: the new catalogue and what changed.

    Experts added since the server started (files not in `files_at_start`) go to the shared pool;
    their adapters load on first use in each replica. Refuses (raises) a router trained for other
    experts, so the caller keeps the current catalogue."""
    from experts.config import expert_files, load_expert_file
    from router.model import load_router

    files = expert_files()
    chosen = {e.name for e in current.config.experts} | (set(files) - set(files_at_start))
    app = dataclasses.replace(
        current.config, experts=tuple(load_expert_file(files[n]) for n in sorted(chosen & set(files)))
    )
    ok, missing = served_experts(app)
    router = load_router(app)  # refuses a router trained for other experts; the old one stays
    pool = current.placement[BASE]
    placement = {BASE: pool, **{n: current.placement.get(n, pool) for n in ok}}  # new: the shared pool
    check_retrieval(app, [e.name for e in app.experts if e.name in placement])
    catalogue = build_catalogue(app, placement, router, previous=current)
    before, after = set(current.specs), set(catalogue.specs)
    return catalogue, {
        "experts": sorted(after),
        "added": sorted(after - before),
        "removed": sorted(before - after),
        "not_served": missing,
    }
