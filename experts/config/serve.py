"""The endpoint's config (conf/serve/<name>.yaml) and `moe propose-experts`, read by `serving/`."""

from __future__ import annotations

from dataclasses import dataclass, field

from experts.config.expert import ResourceSpec
from experts.config.validate import check


@dataclass(frozen=True)
class ServeSpec:
    """The endpoint: where it listens and the limits it enforces."""

    host: str = "127.0.0.1"
    port: int = 8000
    ray_address: str | None = None  # join an existing cluster; None starts a local Ray
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 512  # largest max_tokens a request may ask for
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02
    # Batches a pool replica decodes at once (the engine interleaves their steps): a request that
    # arrives while a batch decodes starts at once instead of waiting for that batch to end.
    max_concurrent_batches: int = 4
    # A stream's chunks at most this often (its first token at once): fewer, larger chunks cost
    # the pool, the ingress and the proxy less per token. 0: a chunk per token.
    stream_interval_s: float = 0.25
    pool: ResourceSpec = field(default_factory=ResourceSpec)
    ingress: ResourceSpec = field(default_factory=lambda: ResourceSpec(num_cpus=0.25))
    api_keys_env: str = "MOE_API_KEYS"  # comma-separated keys; unset = no auth
    api_keys_file: str | None = None
    log_queries: bool = True  # write every request (prompt, expert, answer, latency) to the query log
    log_db: str | None = None  # None = artifacts/logs/queries.sqlite; or postgresql://...
    object_store_mb: int = 256

    def __post_init__(self) -> None:
        check(0 < self.port < 65536, f"serve.port {self.port} is not a port")
        check(self.max_batch_size >= 1, "serve.max_batch_size must be >= 1")
        check(self.max_concurrent_batches >= 1, "serve.max_concurrent_batches must be >= 1")
        check(self.stream_interval_s >= 0, f"serve.stream_interval_s {self.stream_interval_s} must be >= 0")


@dataclass(frozen=True)
class ProposalSpec:
    """`moe propose-experts`: which logged questions count as uncovered, and how they are grouped.

    The values live in conf/config.yaml (`proposals:`), each with the reason for it.
    """

    max_confidence: float  # routed/mixture answers under this router confidence are uncovered too
    since_hours: float | None  # only requests of the last N hours; None: the whole log
    min_queries: int  # the smallest cluster that becomes a proposal (HDBSCAN's min_cluster_size)
    top_terms: int  # terms shown per cluster (the slug takes the first two)
    representatives: int  # questions shown per cluster and written as the draft's examples

    def __post_init__(self) -> None:
        check(0 < self.max_confidence <= 1, f"proposals.max_confidence {self.max_confidence} not in (0, 1]")
        check(
            self.since_hours is None or self.since_hours > 0,
            f"proposals.since_hours {self.since_hours} must be > 0 (or null for the whole log)",
        )
        check(self.min_queries >= 2, f"proposals.min_queries {self.min_queries} must be >= 2")
        check(self.top_terms >= 1, f"proposals.top_terms {self.top_terms} must be >= 1")
        check(self.representatives >= 1, f"proposals.representatives {self.representatives} must be >= 1")
