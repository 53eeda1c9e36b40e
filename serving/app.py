"""The Ray Serve application: an ingress (FastAPI, OpenAI-compatible) and the expert pool(s).

HTTP -> ingress (`serving.ingress`: routes over the completion pipeline of `serving.pipeline`,
which routes in-process with the router and applies the chat template) ->
expert pool deployment (base weights once + every LoRA adapter; `@serve.batch` collects
concurrent requests and decodes them together, one forward pass per step for all experts) ->
streamed deltas back through the ingress. An expert with `serving.dedicated: true` gets its own
pool deployment with its own resources. Everything about placement comes from `conf/serve/` and
the experts' files, so the same app spreads over GPUs or nodes by config alone.

`build_app(app)` is the typed builder; `start_server(app) -> url` / `stop_server()` (or the
`running_server(app)` context manager) run it programmatically; `moe serve` runs it until Ctrl-C.
"""

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from ray import serve

from experts.adapters import BASE
from experts.config import AppConfig, ResourceSpec
from experts.errors import ConfigError, MoeError
from serving.api import AUTO, api_keys
from serving.catalogue import check_retrieval, served_experts
from serving.ingress import Ingress
from serving.pool import ExpertPoolDeployment
from serving.trust.querylog import query_log_url

log = logging.getLogger("serving")
APP_NAME = "moe"


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------
def deployment_options(res: ResourceSpec, name: str) -> dict[str, Any]:
    """Ray Serve options of one deployment from its ResourceSpec."""
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
        "max_ongoing_requests": res.max_ongoing_requests,
        "max_queued_requests": res.max_queued_requests,
    }
    if res.autoscaling:
        options["autoscaling_config"] = dict(res.autoscaling)
    else:
        options["num_replicas"] = res.num_replicas
    return options


def thread_advice(threads: int, cpus: int, engine: str = "process") -> str | None:
    """Why `threads` torch threads per replica will decode slowly on `cpus` CPUs (None: they won't).

    libgomp counts the threads it manages, the process's initial thread included; more than the
    CPUs and it throttles its spinning, so every parallel matmul pays a futex wake-up. The
    "process" engine runs torch on its own process's initial thread (threads managed = threads);
    the "thread" engine runs it off the replica's (threads + 1): on 2 CPUs two threads there decode
    slower than one (docs/benchmarks.md#the-engine-alone, benchmarks/openmp_threads_bench.py)."""
    initial = 1 if engine == "thread" else 0  # the replica's initial thread, counted too
    if threads > 1 and threads + initial > cpus:
        return (
            f"torch_threads={threads} on {cpus} CPUs ({engine} engine): OpenMP would manage "
            f"{threads + initial} threads and throttle them, slower than fewer; "
            f"use torch_threads <= {max(1, cpus - initial)}"
        )
    return None


def build_app(app: AppConfig) -> serve.Application:
    """The typed builder: ingress + one pool per base model + one deployment per dedicated expert.

    Refuses duplicate expert slugs and deployment names. Experts without a complete adapter are
    left out with a warning (requests naming them get 404; the router's picks of them get 503).
    """
    names = app.expert_names()
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"expert(s) {dupes} are configured twice; each slug may appear once")
    ok, missing = served_experts(app)
    for name, reason in missing.items():
        log.warning("not serving %s: %s", name, reason)
    if app.serve.ray_address is None:  # a local instance: this machine's CPUs are the replicas'
        cpus = len(os.sched_getaffinity(0))
        placed = [("serve.pool", app.serve.pool)] + [
            (f"expert {e.name}", e.serving.resources) for e in app.experts if e.serving.dedicated
        ]
        for label, res in placed:
            if advice := thread_advice(res.torch_threads, cpus, res.engine):
                log.warning("%s: %s", label, advice)
    specs = {e.name: e for e in app.experts}
    serve_cfg = app.serve
    pool_name = f"pool_{app.base_model.name}"
    shared = [n for n in ok if not specs[n].serving.dedicated]
    deployments = {
        pool_name: ExpertPoolDeployment.options(**deployment_options(serve_cfg.pool, pool_name)).bind(  # type: ignore[attr-defined]  # @serve.deployment
            app, shared, serve_cfg.pool
        )
    }
    placement = {BASE: pool_name, **{n: pool_name for n in shared}}
    for name in (n for n in ok if specs[n].serving.dedicated):
        res = specs[name].serving.resources
        dep = f"expert_{name}"
        if dep in deployments or dep == "ingress":
            raise ConfigError(f"deployment name {dep!r} is used twice; rename expert {name!r}")
        deployments[dep] = ExpertPoolDeployment.options(**deployment_options(res, dep)).bind(app, [name], res)  # type: ignore[attr-defined]  # @serve.deployment
        placement[name] = dep
    check_retrieval(app, ok)
    log_url = query_log_url(app) if serve_cfg.log_queries else None  # resolved here: replicas' cwd differs
    return Ingress.options(**deployment_options(serve_cfg.ingress, "ingress")).bind(  # type: ignore[attr-defined]  # @serve.deployment
        app, deployments, placement, api_keys(app.serve), log_url
    )


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------
_RUNNING: dict[str, Any] = {}  # what start_server started, so stop_server stops only that


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ray.init to a dead address hangs for minutes: fail in seconds instead."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 10001
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(f"serve.ray_address {address!r}: nothing answers at {host}:{port} ({exc})") from exc


def _wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise MoeError(f"the endpoint at {url} did not become healthy within {timeout_s:.0f} s")
        time.sleep(0.25)


def start_server(app: AppConfig, *, name: str = APP_NAME) -> str:
    """Start (or join) Ray, deploy the app on serve.host:serve.port; return the base URL (…/v1).

    Starts a local Ray instance unless serve.ray_address names a cluster or Ray is already
    initialised in this process. Returns once /health answers.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if _RUNNING:
        raise MoeError(f"a server is already running at {_RUNNING['url']}; stop_server() first")
    application = build_app(app)  # config errors before anything starts
    cfg = app.serve
    started_ray = False
    if not ray.is_initialized():
        if cfg.ray_address:
            _check_reachable(cfg.ray_address)
            ray.init(address=cfg.ray_address, logging_level=logging.WARNING)
        else:
            ray.init(
                address="local",
                include_dashboard=False,
                object_store_memory=cfg.object_store_mb * 2**20,
                logging_level=logging.WARNING,
            )
        started_ray = True
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(application, name=name, route_prefix="/", blocking=False)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        url = f"http://{host}:{cfg.port}"
        _wait_healthy(url)
    except BaseException:
        _shutdown(name, started_ray, joined=bool(cfg.ray_address))
        raise
    _RUNNING.update(url=f"{url}/v1", name=name, started_ray=started_ray, joined=bool(cfg.ray_address))
    if threading.current_thread() is threading.main_thread():
        # Ray replaces Python's SIGINT handler; put it back so Ctrl-C raises KeyboardInterrupt
        # in the caller (`moe serve`, `moe demo`), which then stops what it started.
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)
    return f"{url}/v1"


def _shutdown(name: str, started_ray: bool, joined: bool) -> None:
    import ray

    with contextlib.suppress(Exception):
        if joined:
            serve.delete(name)  # on a shared cluster, only our application
        else:
            serve.shutdown()
    if started_ray:
        ray.shutdown()


def stop_server() -> None:
    """Stop what start_server started: the app (and Serve and Ray when it started them)."""
    if not _RUNNING:
        return
    _shutdown(_RUNNING["name"], _RUNNING["started_ray"], _RUNNING["joined"])
    _RUNNING.clear()


@contextlib.contextmanager
def running_server(app: AppConfig, *, name: str = APP_NAME) -> Iterator[str]:
    """`with running_server(app) as url:` - the endpoint for the block, stopped afterwards."""
    url = start_server(app, name=name)
    try:
        yield url
    finally:
        stop_server()


def serve_command(app: AppConfig, ctx: Any) -> None:
    """`moe serve`: run the endpoint until Ctrl-C (or SIGTERM), then stop what it started."""
    import signal

    url = start_server(app)
    ok, missing = served_experts(app)
    print(f"serving {len(ok)} expert(s) at {url}  (models: {[AUTO, BASE, *ok]})", flush=True)
    for name in missing:
        print(f"  not serving {name!r}: {missing[name]}")
    print(
        f"try: curl -s {url}/chat/completions -H 'Content-Type: application/json' "
        '-d \'{"model": "auto", "messages": [{"role": "user", "content": "What does fork() return?"}]}\''
        "\nCtrl-C stops.",
        flush=True,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.is_set():
            stopped.wait(1.0)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        stop_server()
