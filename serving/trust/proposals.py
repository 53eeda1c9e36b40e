"""Proposals for the next expert: cluster the logged questions no expert covered, draft a file each.

A question is *uncovered* when the router fell back on it, or routed it (alone or as a mixture)
with a confidence under `proposals.max_confidence`. `propose_experts` embeds those questions with
the router's sentence encoder (all-MiniLM-L6-v2), clusters them with scikit-learn's HDBSCAN, and
describes every cluster of at least `proposals.min_queries` questions: size, share of traffic, top
terms, representative questions and its nearest existing expert (cosine distance between the
cluster's centroid and the expert's: its description, examples and the questions the router
confidently sent it). `moe propose-experts` then drafts `conf/expert/<slug>.yaml.proposed` per
cluster (never overwriting a file) and writes `artifacts/reports/proposals.{md,json,png}`.

Why HDBSCAN and not k-means: uncovered traffic is mostly one-off questions. HDBSCAN labels those
noise instead of forcing them into a cluster, needs no k (k-means with k chosen by silhouette cannot
answer "one theme" or "none"), and its one knob, the smallest cluster, is `min_queries` itself.

The drafts hold nothing that is not already in the query log: the questions themselves (as
`examples`) and words taken from them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experts.config import RESERVED_SLUGS, SLUG_RE, AppConfig, ProposalSpec
from experts.errors import ConfigError, MoeError
from serving.trust.querylog import QueryLog, safe_url

PROPOSED_SUFFIX = ".yaml.proposed"
REPORT_NAME = "proposals"  # artifacts/reports/proposals.{md,json,png}
_ENCODE_CHUNK = 256  # questions per progress-bar step
_ROUTED_PER_EXPERT = 200  # confidently routed questions that describe an expert, at most


class ProposalError(MoeError):
    """The query log holds too little to propose anything from."""


@dataclass(frozen=True)
class Cluster:
    """One group of uncovered questions: what `moe propose-experts` prints and drafts from."""

    slug: str
    size: int
    share: float  # of every request in the window
    top_terms: tuple[str, ...]
    representatives: tuple[str, ...]  # nearest the centroid first
    nearest_expert: str | None
    nearest_distance: float | None  # cosine distance of the centroids (0 same, 1 unrelated)
    members: tuple[int, ...]  # indices into `Proposals.questions`

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "members"}


@dataclass(frozen=True)
class Proposals:
    """The result of one clustering run over the log."""

    requests: int  # every request in the window
    questions: tuple[str, ...]  # the uncovered ones, in log order
    labels: tuple[int, ...]  # HDBSCAN's cluster per question (-1: noise)
    clusters: tuple[Cluster, ...]  # biggest first
    coords: np.ndarray  # (questions, 2) PCA of the embeddings, for the scatter plot
    since: float | None

    def summary(self) -> dict[str, Any]:
        return {
            "created": time.time(),
            "since": self.since,
            "requests": self.requests,
            "uncovered": len(self.questions),
            "noise": sum(label < 0 for label in self.labels),
            "clusters": [c.to_dict() for c in self.clusters],
        }


def is_uncovered(row: dict[str, Any], max_confidence: float) -> bool:
    """A fallback, or a routed/mixture answer under `max_confidence`; forced requests never are."""
    if row.get("decision") == "fallback":
        return True
    conf = row.get("confidence")
    return row.get("decision") in ("routed", "mixture") and conf is not None and conf < max_confidence


def _encode(encoder: Any, texts: Sequence[str], desc: str) -> np.ndarray:
    from tqdm import tqdm

    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    chunks = [texts[i : i + _ENCODE_CHUNK] for i in range(0, len(texts), _ENCODE_CHUNK)]
    bar = tqdm(chunks, desc=desc, unit="batch", disable=len(chunks) < 2)
    return np.concatenate([encoder.encode(list(c)) for c in bar])


def _cluster(emb: np.ndarray, min_size: int) -> np.ndarray:
    """HDBSCAN labels (-1: noise). Euclidean distance on unit vectors orders pairs as cosine does."""
    from sklearn.cluster import HDBSCAN

    return HDBSCAN(min_cluster_size=min_size, min_samples=min_size, copy=True).fit_predict(emb)


def _top_terms(docs_by_cluster: list[list[str]], n: int) -> list[list[str]]:
    """Class-based TF-IDF: one document per cluster (noise included, last), so words every group
    uses (how, does, ...) weigh little and each cluster's own words come first."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    joined = [" ".join(d) for d in docs_by_cluster]
    vec = TfidfVectorizer(
        stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z0-9]+\b", sublinear_tf=True
    )
    try:
        matrix = vec.fit_transform(joined).toarray()
    except ValueError:  # only stop words
        return [[] for _ in joined]
    vocab = vec.get_feature_names_out()
    return [[str(vocab[j]) for j in np.argsort(-row, kind="stable")[:n] if row[j] > 0] for row in matrix]


def _slug(terms: Sequence[str], taken: set[str]) -> str:
    """The first two top terms as a slug, made unique against existing experts and earlier drafts."""
    words = [w for w in (t.lower() for t in terms) if SLUG_RE.match(w)][:2] or ["topic"]
    base = "_".join(words)[:40].strip("_") or "topic"
    slug, n = base, 2
    while slug in taken or slug in RESERVED_SLUGS:
        slug, n = f"{base}_{n}", n + 1
    return slug


def _expert_centroids(
    app: AppConfig, encoder: Any, rows: list[dict[str, Any]], spec: ProposalSpec
) -> dict[str, np.ndarray]:
    """Each routable expert as a unit vector: description, examples, and the questions the router
    confidently sent it in the window (real traffic says best what an expert is asked)."""
    texts: list[str] = []
    owner: list[str] = []
    for e in app.experts:
        if not e.routable:
            continue
        routed = [
            r["prompt"]
            for r in rows
            if r.get("expert") == e.name
            and r.get("decision") == "routed"
            and not is_uncovered(r, spec.max_confidence)
        ][-_ROUTED_PER_EXPERT:]
        for t in [e.description, *e.examples, *routed]:
            texts.append(t)
            owner.append(e.name)
    emb = _encode(encoder, texts, "embedding experts")
    out: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(owner):
        v = emb[[i for i, o in enumerate(owner) if o == name]].mean(axis=0)
        out[name] = v / max(float(np.linalg.norm(v)), 1e-9)
    return out


def _coords(emb: np.ndarray) -> np.ndarray:
    if len(emb) < 3:
        return np.zeros((len(emb), 2), dtype=np.float32)
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=0).fit_transform(emb).astype(np.float32)


def _since(spec: ProposalSpec, now: float | None) -> float | None:
    """The window's start (unix seconds), or None for the whole log."""
    return None if spec.since_hours is None else (now or time.time()) - 3600 * spec.since_hours


def load_questions(
    log: QueryLog, spec: ProposalSpec, now: float | None = None
) -> tuple[list[dict], list[dict]]:
    """(every request in the window, the uncovered ones). Raises ProposalError on an empty window."""
    since = _since(spec, now)
    rows = log.requests(since=since)
    if not rows:
        window = "" if since is None else f" in the last {spec.since_hours:g} h (proposals.since_hours)"
        raise ProposalError(
            f"the query log {safe_url(log.url)} has no requests{window}; serve some traffic first"
        )
    uncovered = [r for r in rows if (r.get("prompt") or "").strip() and is_uncovered(r, spec.max_confidence)]
    return rows, uncovered


def propose_experts(app: AppConfig, log: QueryLog, encoder: Any, now: float | None = None) -> Proposals:
    """Cluster the window's uncovered questions; every cluster of >= min_queries is a proposal.

    Raises ProposalError when the window holds no requests, or fewer than `min_queries` of them
    in all (too few to tell a theme from chance).
    """
    spec = _spec(app)
    rows, uncovered = load_questions(log, spec, now)
    since = _since(spec, now)
    if len(rows) < spec.min_queries:
        raise ProposalError(
            f"the query log has only {len(rows)} request(s) in the window, fewer than "
            f"proposals.min_queries={spec.min_queries}; too few to propose an expert from"
        )
    questions = [r["prompt"].strip() for r in uncovered]
    if len(questions) < spec.min_queries:
        return Proposals(
            len(rows), tuple(questions), (-1,) * len(questions), (), _coords(np.zeros((0, 2))), since
        )
    emb = _encode(encoder, questions, "embedding questions")
    labels = _cluster(emb, spec.min_queries)
    ids = sorted({int(x) for x in labels if x >= 0}, key=lambda c: -int((labels == c).sum()))
    groups = [[questions[i] for i in np.flatnonzero(labels == c)] for c in ids]
    terms = _top_terms(
        [*groups, [q for q, x in zip(questions, labels, strict=True) if x < 0]], spec.top_terms
    )
    experts = _expert_centroids(app, encoder, rows, spec)
    taken = {e.name for e in app.experts} | set(_existing_slugs(app))
    clusters = []
    for c, group_terms in zip(ids, terms, strict=False):
        members = np.flatnonzero(labels == c)
        centroid = emb[members].mean(axis=0)
        centroid /= max(float(np.linalg.norm(centroid)), 1e-9)
        order = members[np.argsort(-(emb[members] @ centroid), kind="stable")]
        reps = list(dict.fromkeys(questions[i] for i in order))[: spec.representatives]
        nearest, distance = None, None
        if experts:
            sims = {name: float(v @ centroid) for name, v in experts.items()}
            nearest = max(sims, key=sims.__getitem__)
            distance = round(1.0 - sims[nearest], 4)
        slug = _slug(group_terms, taken)
        taken.add(slug)
        clusters.append(
            Cluster(
                slug=slug,
                size=len(members),
                share=round(len(members) / len(rows), 4),
                top_terms=tuple(group_terms),
                representatives=tuple(reps),
                nearest_expert=nearest,
                nearest_distance=distance,
                members=tuple(int(i) for i in members),
            )
        )
    return Proposals(
        len(rows), tuple(questions), tuple(int(x) for x in labels), tuple(clusters), _coords(emb), since
    )


def _spec(app: AppConfig) -> ProposalSpec:
    if app.proposals is None:
        raise ConfigError(
            "the config has no `proposals:` block (conf/config.yaml); copy it from this project's conf/"
        )
    return app.proposals


def _existing_slugs(app: AppConfig) -> list[str]:
    """Slugs a proposal must not take: every expert file, set-aside ones (`.removed`) included.
    Drafts are left out, so a second run over the same log finds its own drafts and keeps them."""
    from experts.config import config_dir

    files = (
        p for p in (config_dir() / "expert").iterdir() if p.is_file() and not p.name.endswith(PROPOSED_SUFFIX)
    )
    return sorted({p.name.split(".")[0] for p in files})


# --------------------------------------------------------------------------------------------
# Drafts and the report
# --------------------------------------------------------------------------------------------
def _yaml_str(text: str) -> str:
    """A double-quoted YAML scalar OmegaConf reads back verbatim (`${` would be an interpolation)."""
    return json.dumps(text.replace("${", "\\${"), ensure_ascii=True)


def draft_text(cluster: Cluster, today: str) -> str:
    """The `conf/expert/<slug>.yaml.proposed` file of one cluster."""
    terms = ", ".join(cluster.top_terms) or "(no distinctive terms)"
    near = (
        f"nearest existing expert: {cluster.nearest_expert} (cosine distance {cluster.nearest_distance:.2f})"
        if cluster.nearest_expert
        else "no existing expert to compare with"
    )
    description = (
        f"Questions about {', '.join(cluster.top_terms[:3]) or cluster.slug} (proposed from the query log)."
    )
    lines = [
        "# @package _global_",
        f"# Proposed by `moe propose-experts` on {today}: {cluster.size} logged questions "
        f"({100 * cluster.share:.1f}% of traffic) that no expert covered; {near}.",
        f"# Top terms: {terms}",
        "# To accept: point data.path at a folder of documents on this topic, edit the description,",
        f"# then run `moe add-expert {cluster.slug}` (it turns this draft into {cluster.slug}.yaml).",
        "expert:",
        f"  name: {cluster.slug}",
        f"  description: {_yaml_str(description)}",
        "  data:",
        "    source: folder",
        f"    path: ''          # a folder of .txt/.md/.jsonl/.csv documents about: {terms}",
        "    licence: unknown  # the licence of that corpus",
        "  examples:",
        *(f"    - {_yaml_str(q)}" for q in cluster.representatives),
        "",
    ]
    return "\n".join(lines)


def write_drafts(proposals: Proposals, expert_dir: Path, today: str | None = None) -> dict[str, str]:
    """slug -> `written` or `kept` (an existing file is never overwritten)."""
    today = today or time.strftime("%Y-%m-%d")
    out = {}
    for c in proposals.clusters:
        path = expert_dir / f"{c.slug}{PROPOSED_SUFFIX}"
        if path.exists():
            out[c.slug] = "kept"
            continue
        with path.open("x", encoding="utf-8") as fh:  # "x": never overwrite, even in a race
            fh.write(draft_text(c, today))
        out[c.slug] = "written"
    return out


def _scatter(proposals: Proposals, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(proposals.labels)
    fig, ax = plt.subplots(figsize=(7, 5))
    noise = labels < 0
    if noise.any():
        xy = proposals.coords[noise]
        ax.scatter(xy[:, 0], xy[:, 1], s=12, c="#bbbbbb", label=f"noise ({int(noise.sum())})")
    for c in proposals.clusters:
        xy = proposals.coords[list(c.members)]
        ax.scatter(xy[:, 0], xy[:, 1], s=18, label=f"{c.slug} ({c.size})")
    ax.set_title("Uncovered questions (MiniLM embeddings, first two principal components)")
    ax.set_xticks([])
    ax.set_yticks([])
    if proposals.questions:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_cluster(c: Cluster) -> str:
    """What the terminal shows of one proposal."""
    near = f"{c.nearest_expert} (distance {c.nearest_distance:.2f})" if c.nearest_expert else "-"
    lines = [
        f"{c.slug}: {c.size} questions, {100 * c.share:.1f}% of traffic, nearest expert {near}",
        f"  top terms: {', '.join(c.top_terms)}",
        *(f"  - {q}" for q in c.representatives),
    ]
    return "\n".join(lines)


def write_report(proposals: Proposals, drafts: dict[str, str], reports: Path, spec: ProposalSpec) -> Path:
    """proposals.md (with the scatter plot proposals.png) and proposals.json; returns the .md."""
    reports.mkdir(parents=True, exist_ok=True)
    summary = {**proposals.summary(), "drafts": drafts}
    (reports / f"{REPORT_NAME}.json").write_text(json.dumps(summary, indent=1) + "\n")
    _scatter(proposals, reports / f"{REPORT_NAME}.png")
    n = len(proposals.questions)
    md = [
        "# Proposed experts",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {proposals.requests} requests, {n} uncovered "
        f"(fallbacks, and routed answers under confidence {spec.max_confidence}), clustered with HDBSCAN "
        f"(smallest cluster {spec.min_queries}); {summary['noise']} left as noise.",
        "",
        f"![clusters]({REPORT_NAME}.png)",
        "",
        "| draft | questions | share of traffic | nearest expert (cosine distance) | top terms |",
        "|---|---|---|---|---|",
    ]
    for c in proposals.clusters:
        near = f"{c.nearest_expert} ({c.nearest_distance:.2f})" if c.nearest_expert else "-"
        md.append(
            f"| `{c.slug}{PROPOSED_SUFFIX}` ({drafts.get(c.slug, '-')}) | {c.size} | {100 * c.share:.1f}% | "
            f"{near} | {', '.join(c.top_terms)} |"
        )
    for c in proposals.clusters:
        md += ["", f"## {c.slug}", "", *(f"- {q}" for q in c.representatives)]
    path = reports / f"{REPORT_NAME}.md"
    path.write_text("\n".join(md) + "\n")
    return path


def load_summary(app: AppConfig) -> dict[str, Any] | None:
    """The last run's proposals.json (for `moe stats` and the review page), or None."""
    path = app.paths.reports_dir / f"{REPORT_NAME}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def propose_experts_command(app: AppConfig, ctx: Any) -> dict[str, Any]:
    """`moe propose-experts`: print the proposals, draft their files, write the report."""
    from experts.config import config_dir
    from router.encoder import load_encoder
    from serving.trust.querylog import open_query_log

    spec = _spec(app)
    if app.router.encoder_package is None:
        raise ConfigError(
            f"router={app.router.pipeline} has no sentence encoder (router.encoder_package); "
            "run with router=fast, combined, embed or tuned"
        )
    started = time.perf_counter()
    encoder = load_encoder(app.router.encoder_package, app.paths.downloads_dir)
    with open_query_log(app) as log:
        proposals = propose_experts(app, log, encoder)
    n = len(proposals.questions)
    if not proposals.clusters:
        why = (
            f"no uncovered questions among {proposals.requests} requests"
            if n == 0
            else f"{n} uncovered question(s) among {proposals.requests} requests, "
            f"but no group of proposals.min_queries={spec.min_queries} alike"
        )
        print(f"nothing to propose: {why}")
        return {"clusters": [], "uncovered": n, "requests": proposals.requests}
    drafts = write_drafts(proposals, config_dir() / "expert")
    report = write_report(proposals, drafts, app.paths.reports_dir, spec)
    print(
        f"{n} uncovered questions of {proposals.requests} requests -> {len(proposals.clusters)} proposal(s)\n"
    )
    for c in proposals.clusters:
        print(format_cluster(c))
        verb = "drafted" if drafts[c.slug] == "written" else "kept the existing"
        print(f"  {verb} {config_dir() / 'expert' / (c.slug + PROPOSED_SUFFIX)}\n")
    print(f"report: {report}")
    print("accept one: set its data.path to a corpus folder, then `moe add-expert <slug>`")
    return {**proposals.summary(), "drafts": drafts, "seconds": round(time.perf_counter() - started, 2)}
