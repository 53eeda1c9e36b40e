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
    ray_address: str | None = None  # join a cluster (ray://head:10001, auto); None starts a local Ray
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 512  # largest max_tokens a request may ask for
    max_batch_size: int = 32  # requests for different experts share one forward pass
    # A batch waits this long to fill: more throughput under load for a small delay to a lone
    # request (docs/benchmarks.md#serving).
    batch_wait_timeout_s: float = 0.15
    # Batches a pool replica decodes at once (the engine interleaves their steps): a request that
    # arrives while a batch decodes starts at once instead of waiting for that batch to end.
    max_concurrent_batches: int = 4
    # A stream's chunks at most this often (its first token at once): fewer, larger chunks cost
    # the pool, the ingress and the proxy less per token. 0: a chunk per token.
    stream_interval_s: float = 0.25
    # The expert pool: max_ongoing_requests >= max_batch_size * max_concurrent_batches, or batches
    # cannot fill; with engine=process keep torch_threads <= CPUs (thread: threads + 1), beyond
    # that OpenMP throttles (docs/benchmarks.md).
    pool: ResourceSpec = field(
        default_factory=lambda: ResourceSpec(num_cpus=1.0, max_ongoing_requests=128, torch_threads=2)
    )
    ingress: ResourceSpec = field(
        default_factory=lambda: ResourceSpec(num_cpus=0.25, max_ongoing_requests=256, max_queued_requests=512)
    )
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

    Override them as `proposals.<key>=...`.
    """

    # Routed/mixture answers under this router confidence count as uncovered (fallbacks always do).
    max_confidence: float = 0.5
    since_hours: float | None = None  # only requests of the last N hours; None: the whole log
    # The smallest cluster that becomes a proposal (HDBSCAN's min_cluster_size): fewer questions
    # than this are noise, not a niche worth an adapter.
    min_queries: int = 5
    top_terms: int = 8  # terms shown per cluster; the slug is made of the first two
    representatives: int = 5  # questions shown per cluster, written as the draft's examples

    def __post_init__(self) -> None:
        check(0 < self.max_confidence <= 1, f"proposals.max_confidence {self.max_confidence} not in (0, 1]")
        check(
            self.since_hours is None or self.since_hours > 0,
            f"proposals.since_hours {self.since_hours} must be > 0 (or null for the whole log)",
        )
        check(self.min_queries >= 2, f"proposals.min_queries {self.min_queries} must be >= 2")
        check(self.top_terms >= 1, f"proposals.top_terms {self.top_terms} must be >= 1")
        check(self.representatives >= 1, f"proposals.representatives {self.representatives} must be >= 1")
