"""Questions of two made-up themes no expert covers, one-off noise, and covered traffic.

The proposal tests seed a real query log with them and check the clusters against the theme each
question was written for; the benchmark sends them through a running endpoint.
"""

from __future__ import annotations

import random

from serving.trust.querylog import QueryLog

# Each theme: question templates x subjects, so no two questions are the same text.
THEMES: dict[str, tuple[list[str], list[str]]] = {
    "beekeeping": (
        [
            "How do I {} in my beehive?",
            "What is the best way to {} for honey bees?",
            "When should a beekeeper {}?",
            "Why would my bee colony need me to {}?",
        ],
        [
            "treat varroa mites",
            "add a second brood box",
            "feed sugar syrup",
            "spot a swarming queen",
            "harvest the honey frames",
            "requeen an angry hive",
            "winterize the hive",
            "use the smoker",
        ],
    ),
    "sourdough": (
        [
            "How do I {} for sourdough bread?",
            "What is the trick to {} with a sourdough starter?",
            "Why does my sourdough loaf fail when I {}?",
            "When baking sourdough, how long should I {}?",
        ],
        [
            "feed the starter",
            "proof the dough overnight",
            "score the loaf",
            "get an open crumb",
            "bake in a dutch oven",
            "shape a boule",
            "revive a sleepy starter",
            "stretch and fold the dough",
        ],
    ),
}

NOISE = [
    "Who won the football world cup in 1998?",
    "Recommend a good science fiction movie",
    "What's the weather like on Mars?",
    "Tell me a joke about cats",
    "How tall is the Eiffel Tower?",
    "Translate 'good morning' into Japanese",
    "What rhymes with orange?",
    "Best way to learn the guitar as an adult",
    "How many calories are in an avocado?",
    "Which planet has the most moons?",
]

# Questions an expert answers with confidence: in the log, but never uncovered.
COVERED = [
    ("What are the side effects of metformin?", "biomedical"),
    ("Can I use GPL code in a proprietary product?", "legal"),
    ("What does fork() return in the child process?", "unix_man"),
    ("How do I open a file with pathlib?", "python_docs"),
]


def theme_questions(per_theme: int, seed: int = 0) -> dict[str, str]:
    """question -> theme, `per_theme` distinct questions for each theme."""
    rng = random.Random(seed)
    out: dict[str, str] = {}
    for theme, (templates, subjects) in THEMES.items():
        pairs = [(t, s) for t in templates for s in subjects]
        rng.shuffle(pairs)
        for template, subject in pairs[:per_theme]:
            out[template.format(subject)] = theme
    return out


def seed_log(log: QueryLog, per_theme: int = 16, covered: int = 20, seed: int = 0) -> dict[str, str]:
    """Write the themes (as fallbacks and low-confidence routes), the noise and covered traffic.

    Returns question -> theme for every uncovered question (noise: "noise").
    """
    rng = random.Random(seed)
    truth = {**theme_questions(per_theme, seed), **dict.fromkeys(NOISE, "noise")}
    for n, question in enumerate(truth):
        if n % 3 == 0:  # a third routed, but with too little confidence to count as covered
            log.record({"prompt": question, "expert": "legal", "confidence": 0.31, "decision": "routed"})
        else:
            log.record({"prompt": question, "expert": "base", "confidence": 0.12, "decision": "fallback"})
    for i in range(covered):
        question, expert = COVERED[i % len(COVERED)]
        log.record(
            {
                "prompt": question,
                "expert": expert,
                "confidence": 0.9 + 0.05 * rng.random(),
                "decision": "routed",
            }
        )
    log.flush()
    return truth


def seed_covered_only(log: QueryLog, n: int = 20) -> None:
    """A log where the router was confident about everything (and forced requests)."""
    for i in range(n):
        question, expert = COVERED[i % len(COVERED)]
        log.record({"prompt": question, "expert": expert, "confidence": 0.93, "decision": "routed"})
    log.record({"prompt": "Tell me a joke", "model": "legal", "expert": "legal", "decision": "forced"})
    log.flush()
