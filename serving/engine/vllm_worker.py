"""The `vllm` engine's process: vLLM's `LLMEngine` behind the engine process's pipe protocol.

It runs in vLLM's own venv (`make vllm`: vLLM pins transformers < 5.20, the project 5.23), so it
imports the standard library and vLLM only, nothing of this project. The replica's side is
`serving.engine.vllm.VllmEngine` (an `EngineProcess`); the messages are those of
`serving.engine.process`: JSON over a private socket pair, token ids in, deltas out, errors as their type
name and message (the replica rebuilds them from its table).

vLLM steps every request it holds in one forward pass (continuous batching; the LoRA of each row is
its own: Punica kernels on a GPU); the loop here adds batches between steps and sends each
batch its step. Every (expert, adapter version) is one `LoRARequest` with its own id: a new
version loads beside the old one, the old one is removed once no running request uses it, so a
replacement or a hot add fails no request. The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0): one process to start, watch and kill.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger("serving.engine.vllm_worker")

# LoRA ranks vLLM accepts as max_lora_rank (vllm.config.lora); the smallest that fits is used.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _send(conn: Connection, *message: Any) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _recv(conn: Connection) -> list[Any]:
    return json.loads(conn.recv_bytes())


def error(kind: str, message: str, **fields: Any) -> dict[str, Any]:
    """An error as `serving.engine.process.decode_error` rebuilds it (kind: a name in its table)."""
    return {"type": kind, "message": message, **fields}


def delta(text: str, tokens: int, finish: str | None = None, err: dict[str, Any] | None = None) -> dict:
    return {"text": text, "completion_tokens": tokens, "finish_reason": finish, "error": err}


def adapter_rank(folder: str) -> int:
    """The largest LoRA rank of a PEFT adapter (`r`, or its `rank_pattern`)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def lora_rank_limit(ranks: Sequence[int]) -> int:
    """vLLM's max_lora_rank for adapters of these ranks: the smallest allowed value that fits."""
    need = max(ranks, default=1)
    fits = [r for r in LORA_RANKS if r >= need]
    if not fits:
        raise ValueError(f"LoRA rank {need} exceeds vLLM's largest ({LORA_RANKS[-1]})")
    return fits[0]


@dataclass
class _Request:
    """One request of a batch: its vLLM id (None: refused before it started) and progress."""

    rid: str | None
    lora_id: int | None
    tokens: int = 0
    ended: bool = False
    first: dict[str, Any] | None = None  # an error delta to send in the batch's first step


@dataclass
class _Batch:
    requests: list[_Request]
    started: bool = False  # its first step was sent


@dataclass
class Adapters:
    """Expert -> its current LoRARequest, and which ids running requests still use."""

    engine: Any
    rank_limit: int
    current: dict[str, Any] = field(default_factory=dict)  # name -> LoRARequest
    versions: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    users: Counter[int] = field(default_factory=Counter)
    retired: set[int] = field(default_factory=set)
    ids: Any = field(default_factory=lambda: itertools.count(1))

    def ensure(self, name: str, folder: str, version: float) -> None:
        """Load this version of `name` unless it is the current one (raises what failed; the
        version loaded before, if any, stays current)."""
        from vllm.lora.request import LoRARequest

        if self.versions.get(name) == version:
            return
        rank = adapter_rank(folder)
        if rank > self.rank_limit:
            raise ValueError(
                f"expert {name!r}: adapter rank {rank} exceeds the vllm engine's max_lora_rank "
                f"{self.rank_limit} (set from the adapters it started with); restart the pool to serve it"
            )
        lora = LoRARequest(f"{name}@{version}", next(self.ids), str(folder))
        if not self.engine.add_lora(lora):
            raise RuntimeError(f"vLLM did not load the adapter of {name!r} from {folder}")
        old = self.current.get(name)
        self.current[name], self.versions[name] = lora, version
        self.failed.pop(name, None)
        if old is not None:
            self.retire(old.lora_int_id)
        log.info("loaded adapter %s from %s (LoRA id %d)", name, folder, lora.lora_int_id)

    def retire(self, lora_id: int) -> None:
        self.retired.add(lora_id)
        self.release(lora_id, 0)

    def release(self, lora_id: int, n: int = 1) -> None:
        """`n` requests on this id ended; a superseded id nobody uses any more is unloaded."""
        self.users[lora_id] -= n
        if lora_id in self.retired and self.users[lora_id] <= 0:
            self.engine.remove_lora(lora_id)
            self.retired.discard(lora_id)
            del self.users[lora_id]


class Worker:
    """The loop: batches in, vLLM steps, each batch's step out."""

    def __init__(self, conn: Connection, settings: dict[str, Any]):
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.conn = conn
        self.settings = settings
        adapters = settings["adapters"]  # name -> [folder, version]
        ranks = [adapter_rank(folder) for folder, _ in adapters.values()]
        args = EngineArgs(
            model=settings["model"],
            tokenizer=settings["model"],
            dtype=settings["dtype"],
            max_model_len=settings["max_model_len"],
            max_num_seqs=settings["max_num_seqs"],
            enable_lora=True,
            max_loras=settings["max_loras"],
            max_cpu_loras=settings["max_loras"],
            max_lora_rank=lora_rank_limit(ranks),
            gpu_memory_utilization=settings["gpu_memory_utilization"],
            enforce_eager=settings["device"] == "cpu",  # no graphs to capture on a CPU
            disable_log_stats=True,
            trust_remote_code=False,
        )
        self.engine = LLMEngine.from_engine_args(args)
        self.vocab = self.engine.model_config.get_vocab_size()
        self.adapters = Adapters(self.engine, lora_rank_limit(ranks))
        self.adapters.failed.update(settings["failed"])
        for name, (folder, version) in adapters.items():
            try:
                self.adapters.ensure(name, folder, version)
            except Exception as exc:  # that expert is not served; the others are
                log.error("adapter %s does not load: %s", name, exc)
                self.adapters.failed[name] = str(exc)
        self.batches: dict[int, _Batch] = {}
        self.owner: dict[str, tuple[int, int]] = {}  # vLLM request id -> (batch, index)

    def info(self) -> dict[str, Any]:
        import vllm

        return {
            "engine": "vllm",
            "mixtures": False,  # vLLM runs one adapter a row: a mixture's rows cannot be mixed
            "experts": sorted(self.adapters.current),
            "failed": dict(self.adapters.failed),
            "device": self.settings["device"],
            "dtype": self.settings["dtype"],
            "base_weights": "vllm",
            "max_loras": self.settings["max_loras"],
            "max_lora_rank": self.adapters.rank_limit,
            "vllm_version": vllm.__version__,
        }

    # ---------------------------------------------------------------------------------------
    def _sampling(self, params: dict[str, Any]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=params["max_tokens"],
            temperature=params["temperature"],
            top_p=params["top_p"],
            repetition_penalty=params["repetition_penalty"],
            stop=list(params["stop"]) or None,
            ignore_eos=params["ignore_eos"],
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
        )

    def _lora(self, request: dict[str, Any]) -> Any:
        """The LoRARequest of a request's one expert (None: the base), its adapter loaded first."""
        experts = request["experts"]
        if len(experts) != 1:
            raise ValueError(
                f"the vllm engine serves one expert a request, not a mixture of {sorted(experts)} "
                "(vLLM cannot mix adapters in one forward pass)"
            )
        (name,) = experts
        if name == "base":
            return None
        for other, (folder, version) in request["adapters"].items():
            self.adapters.ensure(other, folder, version)
        if name not in self.adapters.current:
            available = ["base", *sorted(self.adapters.current)]
            raise LookupError(name, available)
        return self.adapters.current[name]

    def _start(self, batch: int, i: int, request: dict[str, Any]) -> _Request:
        try:
            prompt = list(request["prompt_ids"])
            if not prompt:
                raise ValueError("a prompt needs at least one token")
            outside = [t for t in prompt if not 0 <= t < self.vocab]
            if outside:
                raise ValueError(
                    f"prompt token id {outside[0]} is outside the vocabulary (0..{self.vocab - 1})"
                )
            lora = self._lora(request)
        except LookupError as exc:
            name, available = exc.args
            err = error(
                "UnknownExpertError", f"unknown expert {name!r}", name=name, available=list(available)
            )
            return _Request(None, None, ended=True, first=delta("", 0, "error", err))
        except Exception as exc:  # this request only
            kind = "RequestError" if isinstance(exc, ValueError) else "ArtifactError"
            return _Request(None, None, ended=True, first=delta("", 0, "error", error(kind, str(exc))))
        rid = f"{batch}:{i}"
        try:
            self.engine.add_request(
                rid, {"prompt_token_ids": prompt}, self._sampling(request["params"]), lora_request=lora
            )
        except Exception as exc:  # vLLM refused it (too long for max_model_len, a bad parameter)
            err = error("RequestError", str(exc), param="prompt")
            return _Request(None, None, ended=True, first=delta("", 0, "error", err))
        lora_id = None if lora is None else lora.lora_int_id
        if lora_id is not None:
            self.adapters.users[lora_id] += 1
        self.owner[rid] = (batch, i)
        return _Request(rid, lora_id)

    def admit(self, batch: int, requests: list[dict[str, Any]]) -> None:
        known = sorted(self.adapters.current), dict(self.adapters.failed)
        held = _Batch([self._start(batch, i, r) for i, r in enumerate(requests)])
        self.batches[batch] = held
        if (sorted(self.adapters.current), dict(self.adapters.failed)) != known:
            _send(self.conn, "info", self.info())
        if all(r.rid is None for r in held.requests):  # every request refused: one step, done
            self._emit(batch, {})

    def _end(self, request: _Request) -> None:
        request.ended = True
        self.owner.pop(request.rid or "", None)
        if request.lora_id is not None:
            self.adapters.release(request.lora_id)

    def cancel(self, batch: int) -> None:
        held = self.batches.pop(batch, None)
        if held is None:
            return
        live = [r for r in held.requests if not r.ended and r.rid is not None]
        if live:
            self.engine.abort_request([r.rid for r in live])
        for r in live:
            self._end(r)

    def _emit(self, batch: int, outputs: dict[int, Any]) -> None:
        """Send `batch` one step: each request's new text (its outputs of this vLLM step)."""
        held = self.batches[batch]
        step: list[dict[str, Any] | None] = []
        for i, r in enumerate(held.requests):
            out = outputs.get(i)
            if not held.started and r.first is not None:
                step.append(r.first)
            elif r.ended:
                step.append(None)
            elif out is None:
                step.append(delta("", r.tokens))  # scheduled later (or prefilling in chunks)
            else:
                completion = out.outputs[0]
                r.tokens += len(completion.token_ids)
                finish = {"stop": "stop", "length": "length"}.get(completion.finish_reason or "")
                if out.finished and finish is None:  # aborted by vLLM itself
                    err = error("EngineError", f"vLLM ended the request ({completion.finish_reason})")
                    step.append(delta(completion.text, r.tokens, "error", err))
                else:
                    step.append(delta(completion.text, r.tokens, finish))
                if out.finished:
                    self._end(r)
        held.started = True
        _send(self.conn, "step", batch, step)
        if all(r.ended for r in held.requests):
            del self.batches[batch]
            _send(self.conn, "done", batch, None)

    def step(self) -> None:
        outputs: dict[int, dict[int, Any]] = {}
        for out in self.engine.step():
            where = self.owner.get(out.request_id)
            if where is not None:
                outputs.setdefault(where[0], {})[where[1]] = out
        for batch, outs in outputs.items():
            if batch in self.batches:
                self._emit(batch, outs)

    def serve(self) -> None:
        """Read batches, step vLLM while it holds requests, send every step back."""
        while True:
            while self.conn.poll(0 if self.engine.has_unfinished_requests() else None):
                kind, batch, payload = _recv(self.conn)
                if kind == "stop":
                    return
                if kind == "cancel":
                    self.cancel(batch)
                elif kind == "decode":
                    self.admit(batch, payload)
            if self.engine.has_unfinished_requests():
                try:
                    self.step()
                except Exception as exc:  # vLLM itself failed: nothing it holds can go on
                    log.exception("vLLM step failed")
                    for batch in list(self.batches):
                        _send(self.conn, "error", batch, error("EngineError", f"vLLM failed: {exc}"))
                    raise


def configure(settings: dict[str, Any]) -> None:
    """vLLM's environment, before it is imported."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    if settings["device"] == "cpu":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings["kv_cache_gib"])
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{settings['threads'] - 1}"


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s vllm-engine %(levelname)s %(message)s")
    conn = Connection(int(argv[0]))
    try:
        kind, settings = _recv(conn)
        assert kind == "init", kind
        configure(settings)
        try:
            worker = Worker(conn, settings)
        except Exception as exc:  # reported to the replica, which fails to start with it
            log.exception("could not start vLLM")
            _send(conn, "failed", f"{type(exc).__name__}: {exc}")
            return 1
        _send(conn, "ready", worker.info())
        worker.serve()
    except (EOFError, OSError, KeyboardInterrupt):  # the replica went away
        return 0
    except Exception:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
