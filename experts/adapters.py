"""The expert pool: one base model, every expert's LoRA adapter beside it (peft multi-adapter).

A forward pass takes one adapter name per row, so requests for different experts share one batch
(LoRAX / vLLM multi-LoRA style). A posterior-weighted mixture of experts expands each request into
one row per expert and mixes their next-token distributions: log sum_k w_k p_k(x), as
Branch-Train-Merge ensembles do.

peft loads and saves the adapters and its `adapter_names` forward is the reference (training and
evaluation use it); the serving engine stacks the adapters for its own forward
(`serving.engine.lora`), rebuilt whenever `revision` moves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from experts.base_model import load_base_model, load_tokenizer, pick_device, pick_dtype
from experts.config import AppConfig, ExpertSpec, PathsSpec
from experts.errors import ArtifactError, UnknownExpertError

log = logging.getLogger(__name__)
BASE = "base"  # API name of the bare base model
PEFT_BASE = "__base__"  # peft's name for "no adapter" inside a mixed batch
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_dir(spec: ExpertSpec, paths: PathsSpec) -> Path:
    """Where an expert's adapter lives: its registered `adapter_path`, else artifacts/experts/<slug>."""
    return Path(spec.adapter_path).expanduser() if spec.adapter_path else paths.expert_dir(spec.name)


def check_adapter(name: str, directory: Path) -> Path:
    """Refuse anything but a complete safetensors PEFT adapter, naming the expert and the file."""
    for file in ADAPTER_FILES:
        if not (directory / file).is_file():
            extra = (
                " (pickled .bin adapters are refused: save with safetensors)"
                if (directory / "adapter_model.bin").exists()
                else ""
            )
            raise ArtifactError(
                f"expert {name!r}: missing {directory / file}{extra}; "
                f"run `moe train expert={name}` or fix expert.adapter_path"
            )
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"expert {name!r}: corrupt {directory / 'adapter_config.json'}: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise ArtifactError(
            f"expert {name!r}: {directory} holds a {config.get('peft_type')!r} adapter; "
            "only LoRA adapters are served"
        )
    if config.get("use_dora"):
        raise ArtifactError(
            f"expert {name!r}: {directory} holds a DoRA adapter; peft cannot mix DoRA with other adapters "
            "in one batch, so it is not served (retrain it with use_dora off)"
        )
    _check_weights(name, directory / ADAPTER_FILES[1])
    return directory


def _check_weights(name: str, path: Path) -> None:
    """Read the safetensors header only (no tensor data): a truncated or garbage file fails here, at
    startup, with its name, instead of in a replica mid-request."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:  # a loading boundary: safetensors raises its own error types
        raise ArtifactError(f"expert {name!r}: corrupt {path}: {exc}; retrain or replace it") from exc
    if not any("lora_" in key for key in keys):
        raise ArtifactError(f"expert {name!r}: {path} holds no LoRA weights ({len(keys)} tensors)")


@dataclass(frozen=True)
class Expansion:
    """Requests expanded into one row per (request, expert) component of a mixture."""

    owner: list[int]  # index of the request each row belongs to
    adapters: list[str]  # peft adapter name of each row
    log_weights: torch.Tensor  # [rows]
    n: int  # number of requests

    @classmethod
    def of(cls, components: Sequence[Mapping[str, float]]) -> Expansion:
        owner, adapters, weights = [], [], []
        for i, comp in enumerate(components):
            total = sum(comp.values())
            if not comp or total <= 0:
                raise ValueError(f"request {i}: mixture weights {dict(comp)} must be positive")
            for name, w in comp.items():
                owner.append(i)
                adapters.append(PEFT_BASE if name == BASE else name)
                weights.append(w / total)
        return cls(owner, adapters, torch.tensor(weights).log(), len(components))

    def expand(self, tensor: torch.Tensor) -> torch.Tensor:
        """Repeat per-request rows into per-component rows."""
        return tensor[torch.tensor(self.owner, device=tensor.device)]

    def mix(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-row logits [rows, ..., V] -> mixed log-probabilities [n, ..., V]."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        logp = logp + self.log_weights.to(logp.device).view(-1, *([1] * (logp.dim() - 1)))
        if len(self.owner) == self.n:  # no mixture: one row per request, in order
            return logp
        return self._sum_by_owner(logp)

    def _sum_by_owner(self, weighted: torch.Tensor) -> torch.Tensor:
        """Weighted per-row log-probabilities [rows, ...] -> each request's log of their sum [n, ...]."""
        owner = torch.tensor(self.owner, device=weighted.device)
        return torch.stack([torch.logsumexp(weighted[owner == i], dim=0) for i in range(self.n)])

    def mix_context(self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Branch-Train-Merge's posterior: per-row logits [rows, T, V] of the requests' tokens
        ids [n, T] -> mixed log-probabilities [n, T, V] where a component's weight at position t is
        its prior weight times its likelihood of the tokens up to t (Bayes' rule over the context;
        padding, mask 0, adds no evidence). The mixture is then never much worse than its best
        component: at most log(1 / prior) nats over the whole sequence."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        nxt = self.expand(ids)[:, 1:].to(logp.device)
        seen = logp[:, :-1].gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        seen = seen * self.expand(mask)[:, 1:].to(seen)
        evidence = torch.cat([torch.zeros_like(seen[:, :1]), seen.cumsum(dim=1)], dim=1)  # [rows, T]
        log_w = self.log_weights.to(logp.device)[:, None] + evidence
        log_w = log_w - self.expand(self._sum_by_owner(log_w))  # renormalised over each request's rows
        return self._sum_by_owner(logp + log_w[..., None])


class ExpertPool:
    """The base model once, with every expert's adapter loaded by name."""

    def __init__(self, model: Any, tokenizer: Any, device: str, dtype: torch.dtype):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.adapters: dict[str, Path] = {}
        self.failed: dict[str, str] = {}  # expert -> reason it could not be loaded
        self.lock = threading.RLock()  # adapter add/remove vs forward passes
        self._peft: dict[str, str] = {}  # expert -> peft's name of its loaded version
        self._loads = 0
        self.revision = 0  # moves on every adapter added, replaced or removed

    @classmethod
    def load(
        cls,
        app: AppConfig,
        names: Sequence[str] | None = None,
        device: str = "auto",
        precision: str = "auto",
        strict: bool = True,
    ) -> ExpertPool:
        """Load the base model and the adapters of `names` (default: every expert with an adapter).

        strict=False: an expert whose adapter is missing or corrupt is recorded in `failed` and the
        others still load (a server keeps serving what it can).
        """
        dev = pick_device(device)
        pool = cls(
            load_base_model(app.base_model, app.paths, dev),
            load_tokenizer(app.base_model, app.paths),
            dev,
            pick_dtype(precision, dev),
        )
        pool.model.eval()
        specs = {e.name: e for e in app.experts}
        for name in names if names is not None else list(specs):
            if name not in specs:
                raise UnknownExpertError(name, list(specs))
            try:
                pool.add(name, adapter_dir(specs[name], app.paths))
            except ArtifactError as exc:
                if strict:
                    raise
                pool.failed[name] = str(exc)
                log.error("%s", exc)
        return pool

    def add(self, name: str, directory: Path) -> None:
        """Load (or replace) an adapter under `name`. A replacement loads beside the version it
        replaces, which keeps serving if the new one fails to load."""
        from peft import PeftModel

        check_adapter(name, directory)
        with self.lock:
            self._loads += 1
            staged = f"{name}__{self._loads}"  # peft's name for this version
            try:
                if not hasattr(self.model, "peft_config"):
                    self.model = PeftModel.from_pretrained(
                        self.model, str(directory), adapter_name=staged, is_trainable=False
                    )
                else:
                    self.model.load_adapter(str(directory), adapter_name=staged, is_trainable=False)
            except Exception as exc:  # a loading boundary: safetensors, peft and torch all raise their own
                if hasattr(self.model, "peft_config") and staged in self.model.peft_config:
                    with contextlib.suppress(Exception):  # drop the half-registered adapter
                        self.model.delete_adapter(staged)
                raise ArtifactError(f"expert {name!r}: cannot load adapter from {directory}: {exc}") from exc
            if name in self._peft:
                self.model.delete_adapter(self._peft[name])
            self._peft[name] = staged
            self.model.eval()
            self.adapters[name] = directory
            self.failed.pop(name, None)
            self.revision += 1

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise UnknownExpertError(name, list(self.adapters))
            self.model.delete_adapter(self._peft.pop(name))
            del self.adapters[name]
            self.revision += 1

    @property
    def peft_names(self) -> dict[str, str]:
        """Expert -> peft's name of its loaded version."""
        return dict(self._peft)

    def names(self) -> list[str]:
        return [BASE, *self.adapters]

    def validate(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in (BASE, PEFT_BASE) and name not in self.adapters:
                raise UnknownExpertError(name, self.names())

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type="cuda" if self.device == "cuda" else "cpu",
                dtype=self.dtype,
                enabled=self.dtype != torch.float32,
            ),
        ):
            yield

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        adapters: Sequence[str],
        past_key_values: Any = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> Any:
        """One forward pass; row i uses adapter `adapters[i]` (`base`/`__base__` = no adapter).

        logits_to_keep=1 computes logits of the last position only (decoding: a prefill would
        otherwise materialise [rows, T, vocab] logits it never reads); a 1-D tensor keeps those
        positions."""
        names = [PEFT_BASE if a in (BASE, PEFT_BASE) else self._peft.get(a, a) for a in adapters]
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "use_cache": True,
            "past_key_values": past_key_values,
        }
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.to(self.device)
        if not isinstance(logits_to_keep, int) or logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        with self.lock, self.autocast():
            if hasattr(self.model, "peft_config"):
                return self.model(**kwargs, adapter_names=names)
            return self.model(**kwargs)

    def mixture_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        components: Sequence[Mapping[str, float]],
        context: bool = False,
    ) -> torch.Tensor:
        """Log-probabilities [n, T, V] of the posterior-weighted mixture, in one batched forward.
        `context`: the weights updated by each component's likelihood of the text so far
        (`Expansion.mix_context`); the served mixture does not do this yet."""
        exp, logits = self.mixture_forward(input_ids, attention_mask, components)
        if context:
            return exp.mix_context(logits, input_ids, attention_mask)
        return exp.mix(logits)

    def mixture_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, components: Sequence[Mapping[str, float]]
    ) -> tuple[Expansion, torch.Tensor]:
        """One batched forward of every request's components: the expansion and its per-row
        logits [rows, T, V], for `Expansion.mix` or `mix_context` (both from one forward)."""
        exp = Expansion.of(components)
        self.validate(exp.adapters)
        out = self.forward(exp.expand(input_ids), exp.expand(attention_mask), exp.adapters)
        return exp, out.logits
