"""`moe eval`'s task table: do the experts answer their domain's questions?

Per domain, on items built from the TEST split only (experts/data/tasks.py, the builders that make
the training instructions from the train split):
  (a) multiple-choice accuracy: 4 options (the document's own answer and three from other test
      documents of the domain), each scored as the answer in the chat format the endpoint uses, by
      CHOICE_RULE (the other rules of CHOICE_RULES are reported beside it, point values only);
  (b) answer loss: the per-token loss (nats) of each question's reference answer, same format.
Rows: the base model, the generalist, the domain's own expert, `routed` (the router's top-1 on the
question) and `mixture` (its posterior-weighted top-k), with 95% bootstrap intervals over items and
paired intervals for own expert - base and own expert - generalist. Every model on a domain gets the
same tokens: that domain expert's system prompt.
(c) forgetting: the answer loss of a small fixed set of everyday questions
(tests/fixtures/general_instructions.yaml) under every model, against the base model's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from experts.adapters import BASE, ExpertPool, adapter_dir
from experts.config import REPO_ROOT, AppConfig, ExpertSpec, GenerationSpec
from experts.data import load_corpus
from experts.data.tasks import Choice, Task, build_choices, build_tasks, check_choices, split_documents
from experts.errors import ArtifactError, DataError
from experts.evaluate import chat_example, sequence_logprobs

GENERAL_INSTRUCTIONS = REPO_ROOT / "tests" / "fixtures" / "general_instructions.yaml"
MAX_LEN = 384  # tokens of one scored exchange (prompts are <= ~150 words, answers <= ~100)
BOOTSTRAP = 1000  # resamples of the items for each interval
OWN = "own expert"
Model = str | dict[str, float]  # one adapter for every row, or a mixture's weights
Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a row's mc scores, qa scores, mc priors


def load_general_instructions(path: Path | None = None) -> list[dict[str, str]]:
    """The everyday questions with reference answers of the forgetting check."""
    rows = yaml.safe_load(Path(path or GENERAL_INSTRUCTIONS).read_text())
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and {"prompt", "response"} <= set(r) for r in rows
    ):
        raise DataError(f"{path or GENERAL_INSTRUCTIONS}: expected a list of {{prompt, response}} mappings")
    return [{"prompt": str(r["prompt"]), "response": str(r["response"])} for r in rows]


def domain_items(spec: ExpertSpec, app: AppConfig) -> tuple[list[Choice], list[Task]]:
    """The domain's multiple-choice items and reference-answer questions, from its test split only."""
    docs = split_documents(load_corpus(spec.name, app.paths)["test"])
    choices = build_choices(spec.data.source, docs, app.train.task_items, app.train.task_distractors)
    check_choices(
        choices, spec.data.source, docs
    )  # every key is its document's answer, every option a test doc
    return choices, build_tasks(spec.data.source, docs, app.train.task_items)


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def _scorer(
    pool: ExpertPool, batch: int
) -> Callable[[Sequence[tuple[list[int], list[int]]], Sequence[Model]], torch.Tensor]:
    """score(examples, model per example) -> [n, 2] (summed log-probability, tokens)."""
    pad = pool.tokenizer.pad_token_id or 0

    def score(examples: Sequence[tuple[list[int], list[int]]], models: Sequence[Model]) -> torch.Tensor:
        if all(isinstance(m, str) for m in models):
            return sequence_logprobs(
                lambda ids, mask, idx: pool.forward(ids, mask, [models[i] for i in idx]).logits,  # type: ignore[misc]
                examples,
                batch,
                pad_id=pad,
            )
        return sequence_logprobs(
            lambda ids, mask, idx: pool.mixture_logprobs(ids, mask, [models[i] for i in idx]),  # type: ignore[misc]
            examples,
            batch,
            logprobs=True,
            pad_id=pad,
        )

    return score


# How an option's log-likelihood becomes its score. "mean" (per token) let options the model finds
# likely anywhere win: on the politics items a famous name ("Barack Obama": after "Barack" the rest
# is near-certain) took 12 of 32 answers and accuracy fell below chance (docs/benchmarks.md, Tasks).
#   sum        log P(option | question), summed over its tokens (favours short options)
#   mean       the same per token
#   per_char   the same per UTF-8 byte of the option (lm-evaluation-harness's acc_norm)
#   calibrated log P(option | question) - log P(option | the question's instruction alone): what the
#              passage adds, the option's prior cancelled (domain-conditional PMI, Holtzman et al. 2021)
CHOICE_RULES = ("sum", "mean", "per_char", "calibrated")
CHOICE_RULE = "calibrated"
NEUTRAL_QUESTION = "Answer:"  # the prior's prompt for a question with no passage to take away


def neutral_question(question: str) -> str:
    """The question without its passage: the instruction line before the first blank line."""
    head, sep, _ = question.partition("\n\n")
    return head.strip() if sep and head.strip() else NEUTRAL_QUESTION


def choice_correct(
    scores: torch.Tensor,
    choices: Sequence[Choice],
    rule: str = CHOICE_RULE,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """1.0 where the option scoring highest by `rule` is the keyed one.

    `scores`: [items * options, 2] (summed log-probability, tokens) of each option after its
    question; `prior`: the same after `neutral_question` (needed by "calibrated")."""
    n = len(choices)
    total, tokens = scores[:, 0].view(n, -1), scores[:, 1].view(n, -1).clamp(min=1)
    if rule == "sum":
        value = total
    elif rule == "mean":
        value = total / tokens
    elif rule == "per_char":
        size = torch.tensor([[len(o.encode()) for o in c.options] for c in choices], dtype=torch.float)
        value = total / size.clamp(min=1)
    elif rule == "calibrated":
        if prior is None:
            raise ValueError("the calibrated rule needs the options' scores after the neutral question")
        value = total - prior[:, 0].view(n, -1)
    else:
        raise ValueError(f"unknown multiple-choice rule {rule!r}; choose one of {list(CHOICE_RULES)}")
    return (value.argmax(dim=1) == torch.tensor([c.answer for c in choices])).float()


def _model_key(model: Model) -> str:
    return model if isinstance(model, str) else repr(sorted(model.items()))


def choice_priors(
    score: Callable[..., torch.Tensor],
    tok: Any,
    system: str,
    choices: Sequence[Choice],
    models: Sequence[Model],
) -> torch.Tensor:
    """Each option's score after its item's `neutral_question`, under that item's model -> [items *
    options, 2]. Items share instructions and options, so each distinct triple is scored once."""
    model_of = {_model_key(m): m for m in models}
    keys = [
        (_model_key(m), neutral_question(c.question), o)
        for c, m in zip(choices, models, strict=True)
        for o in c.options
    ]
    unique = list(dict.fromkeys(keys))
    if not unique:
        return torch.zeros(0, 2)
    scored = score(
        _example_rows(tok, system, [(q, o) for _, q, o in unique]), [model_of[k[0]] for k in unique]
    )
    at = {k: i for i, k in enumerate(unique)}
    return scored[[at[k] for k in keys]]


def _resamples(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, n, (BOOTSTRAP, n), generator=torch.Generator().manual_seed(seed))


def interval(values: torch.Tensor, weights: torch.Tensor | None = None, seed: int = 0) -> dict[str, float]:
    """The (weighted) mean of per-item values and its 95% percentile-bootstrap interval over items."""
    w = torch.ones_like(values) if weights is None else weights
    idx = _resamples(len(values), seed)
    boot = (values[idx] * w[idx]).sum(1) / w[idx].sum(1).clamp(min=1e-9)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975])).tolist()
    return {
        "value": round(float((values * w).sum() / w.sum()), 4),
        "lo": round(lo, 4),
        "hi": round(hi, 4),
        "n": len(values),
    }


def _row_stats(kind: str, per_item: torch.Tensor, seed: int) -> dict[str, float]:
    if kind == "accuracy":
        return interval(per_item, seed=seed)
    return interval(*answer_losses(per_item), seed=seed)


def answer_losses(per_item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[summed log-probability, tokens] per item -> each item's loss (nats per token) and its
    tokens, the weights of a token-weighted mean."""
    return -per_item[:, 0] / per_item[:, 1].clamp(min=1), per_item[:, 1]


def _example_rows(
    tok: Any, system: str, pairs: Sequence[tuple[str, str]]
) -> list[tuple[list[int], list[int]]]:
    return [chat_example(tok, system, p, r, MAX_LEN) for p, r in pairs]


def task_matrix(
    app: AppConfig,
    router: Any | None,
    pool: ExpertPool | None = None,
    progress: bool = True,
    answers: bool = True,
) -> dict[str, Any]:
    """Multiple-choice accuracy and answer loss per domain and model, and the forgetting check.
    answers=False: multiple choice only (no answer loss, no forgetting check), a quicker look."""
    domains = [e for e in app.experts if e.routable]
    trained = [
        e.name for e in app.experts if (adapter_dir(e, app.paths) / "adapter_model.safetensors").exists()
    ]
    missing = sorted({d.name for d in domains} - set(trained))
    if missing:
        raise ArtifactError(f"no adapter for expert(s) {missing}; run `moe train expert=all` first")
    pool = pool or ExpertPool.load(app, trained, device=app.train.device, precision=app.train.precision)
    score = _scorer(pool, app.train.batch_size)
    tok = pool.tokenizer
    accuracy: dict[str, dict[str, Any]] = {}
    by_rule: dict[str, dict[str, dict[str, float]]] = {rule: {} for rule in CHOICE_RULES}
    loss: dict[str, dict[str, Any]] = {}
    claims: dict[str, Any] = {}
    items: dict[str, dict[str, int]] = {}
    scores: dict[str, dict[str, Any]] = {}  # per domain: item keys and each row's per-item scores
    rows_per_domain = 3 + (2 if router is not None else 0)  # base, generalist, own, routed, mixture
    bar = tqdm(total=len(domains) * rows_per_domain + 1, desc="eval tasks", disable=not progress)
    for seed, spec in enumerate(domains):
        choices, tasks = domain_items(spec, app)
        tasks = tasks if answers else []
        system = spec.generation.system_prompt
        mc = _example_rows(tok, system, [(c.question, o) for c in choices for o in c.options])
        qa = _example_rows(tok, system, [(t.prompt, t.response) for t in tasks])
        items[spec.name] = {"choices": len(choices), "questions": len(tasks)}
        fixed = {BASE: BASE, OWN: spec.name}
        if "generalist" in pool.adapters:
            fixed["generalist"] = "generalist"
        cache: dict[str, Scores] = {}  # adapter -> (mc scores, qa scores, mc priors)
        for adapter in dict.fromkeys(fixed.values()):
            cache[adapter] = (
                score(mc, [adapter] * len(mc)),
                score(qa, [adapter] * len(qa)),
                choice_priors(score, tok, system, choices, [adapter] * len(choices)),
            )
            bar.update(1)
        results = {row: cache[adapter] for row, adapter in fixed.items()}
        if router is not None:
            results["routed"] = _routed(router, score, cache, choices, tasks, mc, qa, (tok, system))
            bar.update(1)
            mix_c, mix_t = (
                router.mixture_weights([c.question for c in choices]),
                router.mixture_weights([t.prompt for t in tasks]),
            )
            results["mixture"] = (
                score(mc, [w for w in mix_c for _ in range(len(choices[0].options))])
                if choices
                else torch.zeros(0, 2),
                score(qa, mix_t) if tasks else torch.zeros(0, 2),
                choice_priors(score, tok, system, choices, mix_c),
            )
        per_item: dict[str, torch.Tensor] = {}
        scores[spec.name] = {
            "choice_items": [_item_key(c) for c in choices],
            "answer_items": [_item_key(t) for t in tasks],
        }
        for row, (mc_scores, qa_scores, priors) in results.items():
            per_item[row] = choice_correct(mc_scores, choices, prior=priors) if choices else torch.zeros(0)
            if choices:
                accuracy.setdefault(row, {})[spec.name] = interval(per_item[row], seed=seed)
                for rule in CHOICE_RULES:
                    right = choice_correct(mc_scores, choices, rule, priors)
                    by_rule[rule].setdefault(row, {})[spec.name] = round(float(right.mean()), 4)
            if tasks:
                loss.setdefault(row, {})[spec.name] = _row_stats("loss", qa_scores, seed)
            scores[spec.name][row] = {
                "choice": per_item[row].int().tolist(),
                "answer": [[round(lp, 4), int(n)] for lp, n in qa_scores.tolist()],
            }
        if choices:
            claims[spec.name] = {
                f"{OWN} - {other}": interval(per_item[OWN] - per_item[other], seed=seed)
                for other in ("base", "generalist")
                if other in per_item
            }
        bar.update(
            rows_per_domain - len(cache) - (1 if router is not None else 0)
        )  # mixture, or rows not run
    general = _general(app, pool, score, tok) if answers else {}
    bar.update(1)
    bar.close()
    return {
        "domains": [d.name for d in domains],
        "items": items,
        "choice_rule": CHOICE_RULE,
        "choice_accuracy": accuracy,
        "choice_accuracy_by_rule": by_rule,
        "answer_loss": loss,
        "claims": claims,
        "general": general,
        "per_item": scores,
    }


def _item_key(item: Choice | Task) -> str:
    """Names one item across runs: the builders are deterministic, so the same split and settings
    give the same keys (`paired_difference` checks they match); a choice's key names its options."""
    if isinstance(item, Choice):
        options = hashlib.sha1("\x00".join(item.options).encode()).hexdigest()[:8]
        return f"{item.kind}:{item.doc_id}:{options}"
    return f"{item.kind}:{item.doc_id}"


def _routed(
    router: Any,
    score: Callable[..., torch.Tensor],
    cache: dict[str, Scores],
    choices: Sequence[Choice],
    tasks: Sequence[Task],
    mc: Sequence[tuple[list[int], list[int]]],
    qa: Sequence[tuple[list[int], list[int]]],
    chat: tuple[Any, str],
) -> Scores:
    """Each question answered by the router's top-1 expert; scores reused where already computed.
    `chat`: (tokenizer, system prompt) for the options' priors."""
    width = len(choices[0].options) if choices else 0
    picks_c = [d.expert for d in router.decide([c.question for c in choices], policy="top1")]
    picks_t = [d.expert for d in router.decide([t.prompt for t in tasks], policy="top1")]

    def assemble(examples: Sequence[Any], picks: list[str], part: int) -> torch.Tensor:
        out = torch.zeros(len(examples), 2)
        todo = [i for i, p in enumerate(picks) if p not in cache]
        if todo:
            out[todo] = score([examples[i] for i in todo], [picks[i] for i in todo])
        for i, p in enumerate(picks):
            if p in cache:
                out[i] = cache[p][part][i]
        return out

    neutral = _example_rows(*chat, [(neutral_question(c.question), o) for c in choices for o in c.options])
    per_option = [p for p in picks_c for _ in range(width)]
    return assemble(mc, per_option, 0), assemble(qa, picks_t, 1), assemble(neutral, per_option, 2)


def _general(
    app: AppConfig, pool: ExpertPool, score: Callable[..., torch.Tensor], tok: Any
) -> dict[str, Any]:
    """Answer loss of the everyday questions under every model, and its change against the base."""
    rows = load_general_instructions()
    examples = _example_rows(
        tok, GenerationSpec().system_prompt, [(r["prompt"], r["response"]) for r in rows]
    )
    out: dict[str, Any] = {}
    for model in [BASE, *pool.adapters]:
        out[model] = _row_stats("loss", score(examples, [model] * len(examples)), 0)
    base = out[BASE]["value"]
    for stats in out.values():
        stats["change_vs_base"] = round(stats["value"] / base - 1, 4)
    return out
