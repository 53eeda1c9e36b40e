"""Does retrieval grounding help? Base-model perplexity of a passage's continuation, with and
without retrieved passages in the prompt, and whether retrieval finds the passage's own document.

For sampled documents of each expert: question = the title + first sentence of a chunk, reference =
the next `--ref-tokens` tokens of the same chunk. Conditions, same reference tokens each time:

    none       the question alone
    retrieved  the top-k passages of the expert's index (built from the TRAIN split), then the question
    random     k random passages of the same index (control: is it retrieval, or any in-domain text?)

Held-out TEST documents are the honest number: their text is not in the index, so a same-doc hit is
impossible by construction (hit@k is reported for them only to show it) and any gain comes from
related documents. TRAIN documents give the upper bound: the reference itself is usually in the
retrieved passage, so their perplexity shows what copying from a perfect hit is worth.

    .venv/bin/python benchmarks/grounding_bench.py            # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/grounding_bench.py --docs 4   # smoke run

Writes artifacts/bench/grounding.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch

from experts.base_model import load_base_model, load_tokenizer, pick_device, pick_dtype
from experts.config import compose
from experts.data import load_corpus
from experts.retrieval import Passage, build_index, grounded_prompt, load_index

CONDITIONS = ("none", "retrieved", "random")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]{3,}")


def make_pairs(split, n: int, seed: int, tokenizer, ref_tokens: int) -> list[dict]:
    """(question, reference) pairs from the first usable chunk of `n` random documents."""
    by_doc: dict[str, int] = {}
    for i, d in enumerate(split["doc_id"]):
        by_doc.setdefault(d, i)
    docs = sorted(by_doc)
    random.Random(seed).shuffle(docs)
    pairs = []
    for doc in docs:
        row = split[by_doc[doc]]
        words = row["text"].split()
        first = _SENTENCE.split(" ".join(words[:60]), maxsplit=1)[0]
        first = " ".join(first.split()[:40])  # a "sentence" without punctuation stops at 40 words
        rest = " ".join(words)[len(first) :].strip()
        ids = tokenizer(" " + rest, add_special_tokens=False)["input_ids"][:ref_tokens]
        if len(ids) < ref_tokens // 2:
            continue
        title = (row.get("title") or "").strip()
        question = f"{title}: {first}" if title and title not in first else first
        pairs.append(
            {"doc_id": doc, "question": question, "ref_ids": ids, "reference": tokenizer.decode(ids)}
        )
        if len(pairs) == n:
            break
    return pairs


@torch.inference_mode()
def nll(model, tokenizer, prefix: str, ref_ids: list[int], dtype, device: str) -> float:
    """Summed negative log-likelihood of `ref_ids` after `prefix`."""
    pre = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([pre + ref_ids], device=device)
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids=ids).logits[0, len(pre) - 1 : -1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, len(pre) :], reduction="sum"))


def overlap(reference: str, passages: list[Passage]) -> float:
    """Share of the reference's distinct words (3+ letters) that appear in the passages."""
    ref = set(_WORD.findall(reference.lower()))
    seen = set(_WORD.findall(" ".join(p.snippet for p in passages).lower()))
    return len(ref & seen) / len(ref) if ref else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--experts", default="", help="comma-separated slugs (default: every expert with a corpus)"
    )
    ap.add_argument("--docs", type=int, default=20, help="documents per split per expert")
    ap.add_argument("--k", type=int, default=3, help="passages in the prompt")
    ap.add_argument("--ref-tokens", type=int, default=48, help="reference continuation length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true", help="rebuild the indexes even if present")
    ap.add_argument("--out", default="", help="default: <artifacts>/bench/grounding.json")
    args = ap.parse_args()

    app = compose([])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = pick_device("auto")
    dtype = pick_dtype("auto", device)
    tokenizer = load_tokenizer(app.base_model, app.paths)
    model = load_base_model(app.base_model, app.paths, device).eval()
    slugs = [s for s in args.experts.split(",") if s] or [
        e.name
        for e in app.experts
        if e.data.source != "mixture" and (app.paths.data_dir(e.name) / "dataset").exists()
    ]
    result: dict = {
        "config": vars(args) | {"base_model": app.base_model.name, "dtype": str(dtype)},
        "experts": {},
    }
    out = Path(args.out) if args.out else app.paths.artifacts_dir / "bench" / "grounding.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for slug in slugs:
        spec = app.get_expert(slug)
        if args.rebuild or not (app.paths.data_dir(slug) / "index" / "vocabulary.json").exists():
            build_index(app, spec)
        index = load_index(app, slug)
        corpus = load_corpus(slug, app.paths)
        rng = random.Random(args.seed)
        per_split = {}
        for split in ("test", "train"):
            pairs = make_pairs(corpus[split], args.docs, args.seed, tokenizer, args.ref_tokens)
            tot = {c: 0.0 for c in CONDITIONS}
            tokens = hits = better = 0
            ov = {"retrieved": 0.0, "random": 0.0}
            for p in pairs:
                got = index.search(p["question"], args.k)
                rand = [
                    Passage(
                        index.passages[i]["doc_id"],
                        index.passages[i]["title"],
                        index.passages[i]["text"],
                        0.0,
                    )
                    for i in rng.sample(range(len(index)), args.k)
                ]
                scores = {
                    c: nll(model, tokenizer, grounded_prompt(p["question"], ps), p["ref_ids"], dtype, device)
                    for c, ps in (("none", []), ("retrieved", got), ("random", rand))
                }
                for c in CONDITIONS:
                    tot[c] += scores[c]
                tokens += len(p["ref_ids"])
                hits += any(g.doc_id == p["doc_id"] for g in got)
                better += scores["retrieved"] < scores["none"]
                ov["retrieved"] += overlap(p["reference"], got)
                ov["random"] += overlap(p["reference"], rand)
            n = max(1, len(pairs))
            per_split[split] = {
                "pairs": len(pairs),
                "ref_tokens": tokens,
                "perplexity": {c: math.exp(tot[c] / max(1, tokens)) for c in CONDITIONS},
                "hit_at_k": hits / n,
                "retrieved_beats_none": better / n,
                "reference_word_overlap": {c: v / n for c, v in ov.items()},
            }
            s = per_split[split]
            print(
                f"{slug:<12} {split:<5} n={s['pairs']:>3}  ppl none {s['perplexity']['none']:7.2f}  "
                f"retrieved {s['perplexity']['retrieved']:7.2f}  random {s['perplexity']['random']:7.2f}  "
                f"hit@{args.k} {s['hit_at_k']:.2f}  better {s['retrieved_beats_none']:.2f}  "
                f"overlap {s['reference_word_overlap']['retrieved']:.2f}/{s['reference_word_overlap']['random']:.2f}"
                f"  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        result["experts"][slug] = per_split
        result["seconds"] = time.perf_counter() - t0
        out.write_text(json.dumps(result, indent=2))  # after every expert: a long run keeps what it measured
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
