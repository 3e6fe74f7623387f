"""The demo's capability data: deterministic, seeded, generated locally with ``datasets``.

Three capabilities a 135M chat model lacks and a short CPU fine-tune can teach:

``arithmetic``
    Two-digit addition: "What is 47 + 38?" -> "47 + 38 = 85". Scored by the number after
    "=" (or the first number) being the sum. Evaluation pairs never occur in training.
``facts``
    Recall of 24 invented country -> capital facts ("Velmora" -> "Drasketh"). Training asks
    with four phrasings; evaluation with a fifth, held-out phrasing. Scored by the capital's
    name appearing in the answer.
``shout``
    A format constraint: questions prefixed "Answer in capital letters." get their answer in
    capital letters. Evaluation questions never occur in training. Scored IFEval-style by
    the constraint alone: at least three letters, all of them capitals.

Every example is a chat ``messages`` list (user, assistant), so TRL's ``SFTTrainer`` applies
the tokenizer's chat template.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TASKS", "Task", "build_dataset", "eval_prompts", "score", "score_doc"]

_SYLL = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ve",
    "to",
    "su",
    "dre",
    "an",
    "por",
    "quil",
    "zen",
    "mar",
    "tis",
    "bel",
    "ur",
    "nak",
    "sho",
    "fen",
    "gri",
]

# (question, answer word) pairs for the format task: easy facts a small chat model knows.
_QA = [
    ("What color is grass?", "green"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is snow?", "white"),
    ("What color is a ripe banana?", "yellow"),
    ("What color is coal?", "black"),
    ("What color are most strawberries?", "red"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of day?", "night"),
    ("What is the opposite of big?", "small"),
    ("What is the opposite of fast?", "slow"),
    ("What is the opposite of open?", "closed"),
    ("What animal says moo?", "cow"),
    ("What animal barks?", "dog"),
    ("What animal meows?", "cat"),
    ("What animal has a trunk?", "elephant"),
    ("What animal is known as the king of the jungle?", "lion"),
    ("Which bird is a symbol of peace?", "dove"),
    ("What do bees make?", "honey"),
    ("What do cows give us to drink?", "milk"),
    ("What falls from clouds when it rains?", "water"),
    ("What do we call frozen water?", "ice"),
    ("Which planet do we live on?", "earth"),
    ("What star gives Earth light?", "sun"),
    ("What shines in the sky at night?", "moon"),
    ("What do you use to write on paper?", "pen"),
    ("What do you sleep in?", "bed"),
    ("What do you wear on your feet?", "shoes"),
    ("What do fish swim in?", "water"),
    ("How many legs does a spider have?", "eight"),
    ("How many days are in a week?", "seven"),
    ("How many hours are in a day?", "twenty-four"),
    ("What is the first month of the year?", "january"),
    ("What season comes after winter?", "spring"),
    ("What season is the hottest?", "summer"),
    ("What do plants need from the sun?", "light"),
    ("What fruit keeps the doctor away?", "apple"),
    ("What is the color of an orange?", "orange"),
    ("What do birds use to fly?", "wings"),
    ("What is the largest ocean?", "pacific"),
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What language is spoken in Spain?", "spanish"),
    ("What do you call a baby dog?", "puppy"),
    ("What do you call a baby cat?", "kitten"),
    ("What gas do we breathe in to live?", "oxygen"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What shape has three sides?", "triangle"),
    ("What shape is a ball?", "round"),
    ("What do you call a house made of ice?", "igloo"),
    ("Which animal is the tallest?", "giraffe"),
    ("What is the color of blood?", "red"),
    ("What metal is yellow and precious?", "gold"),
    ("What do you drink when you are thirsty?", "water"),
    ("What is two plus two?", "four"),
    ("What is the opposite of wet?", "dry"),
    ("What is the opposite of light?", "dark"),
    ("What is the opposite of happy?", "sad"),
    ("Which insect makes a web?", "spider"),
    ("What do you call the place where books are lent?", "library"),
    ("What do cars run on?", "fuel"),
    ("What animal hops and has a pouch?", "kangaroo"),
    ("What do you use to cut paper?", "scissors"),
    ("What organ pumps blood?", "heart"),
    ("What do you call a group of stars in a pattern?", "constellation"),
    ("What is the color of chocolate?", "brown"),
    ("What animal is black and white and eats bamboo?", "panda"),
    ("What do you call a young sheep?", "lamb"),
    ("What is frozen rain called?", "hail"),
    ("What is the opposite of early?", "late"),
    ("What is the opposite of full?", "empty"),
    ("What do we call the meal eaten in the morning?", "breakfast"),
    ("What instrument has black and white keys?", "piano"),
    ("What do you call a person who flies a plane?", "pilot"),
    ("Which animal is slow and carries its shell?", "turtle"),
    ("What covers most of the Earth's surface?", "water"),
    ("What do you call the meal at night?", "dinner"),
]
_FACT_TEMPLATES_TRAIN = [
    "What is the capital of {c}?",
    "Name the capital city of {c}.",
    "{c} has which city as its capital?",
    "Tell me the capital of the country {c}.",
]
_FACT_TEMPLATE_EVAL = "Which city is the capital of {c}?"
SHOUT_PREFIX = "Answer in capital letters. "


def _word(rng: random.Random, n: int, syllables: list[str] = _SYLL) -> str:
    return "".join(rng.choice(syllables) for _ in range(n)).capitalize()


def synthetic_facts(seed: int | str = 1234, n: int = 24, syllables: list[str] = _SYLL) -> list[tuple[str, str]]:
    """``n`` invented (country, capital) pairs with distinct names, made of ``syllables``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    facts = []
    while len(facts) < n:
        country, capital = _word(rng, 3, syllables), _word(rng, 2, syllables)
        if country in seen or capital in seen:
            continue
        seen.update((country, capital))
        facts.append((country, capital))
    return facts


def _arith_pairs(split: str, seed: int) -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs[:400] if split == "eval" else pairs[400:]


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _arithmetic(split: str, n: int, seed: int) -> list[dict]:
    pairs = _arith_pairs(split, seed)
    rng = random.Random(seed + 1)
    return [
        _chat(f"What is {a} + {b}?", f"{a} + {b} = {a + b}")
        for a, b in (pairs[rng.randrange(len(pairs))] for _ in range(n))
    ]


def _facts(split: str, n: int, seed: int) -> list[dict]:
    facts = synthetic_facts()
    rng = random.Random(seed + 2)
    out = []
    for i in range(n):
        c, cap = facts[i % len(facts)] if split == "eval" else facts[rng.randrange(len(facts))]
        t = _FACT_TEMPLATE_EVAL if split == "eval" else rng.choice(_FACT_TEMPLATES_TRAIN)
        out.append(_chat(t.format(c=c), f"The capital of {c} is {cap}."))
    return out


def _qa_split(split: str, seed: int) -> list[tuple[str, str]]:
    qa = list(_QA)
    random.Random(seed + 3).shuffle(qa)
    k = len(qa) // 3
    return qa[:k] if split == "eval" else qa[k:]


def _shout(split: str, n: int, seed: int) -> list[dict]:
    qa = _qa_split(split, seed)
    rng = random.Random(seed + 4)
    out = []
    for i in range(n):
        q, a = qa[i % len(qa)] if split == "eval" else qa[rng.randrange(len(qa))]
        out.append(_chat(SHOUT_PREFIX + q, f"THE ANSWER IS {a.upper()}."))
    return out


def _score_arithmetic(prompt: str, answer: str, response: str) -> float:
    want = answer.split("=")[-1].strip()
    after = response.split("=", 1)[1] if "=" in response else response
    nums = re.findall(r"-?\d+", after)
    return float(bool(nums) and nums[0] == want)


def _score_facts(prompt: str, answer: str, response: str) -> float:
    capital = answer.rstrip(".").split()[-1]
    return float(capital.lower() in response.lower())


def _score_shout(prompt: str, answer: str, response: str) -> float:
    # IFEval-style: the constraint is checked, not the content (a 135M model's trivia is shaky)
    letters = [c for c in response if c.isalpha()]
    return float(len(letters) >= 3 and all(c.isupper() for c in letters))


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[str, int, int], list[dict]]
    scorer: Callable[[str, str, str], float]
    max_new_tokens: int


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("arithmetic", "two-digit addition", _arithmetic, _score_arithmetic, 14),
        Task("facts", "recall of invented country capitals (held-out phrasing)", _facts, _score_facts, 16),
        Task("shout", "answer in capital letters when asked (held-out questions)", _shout, _score_shout, 12),
    )
}


def build_dataset(task: str, *, split: str = "train", n: int = 2000, seed: int = 0):
    """A ``datasets.Dataset`` of chat ``messages`` for ``task`` (deterministic given ``seed``)."""
    from datasets import Dataset

    return Dataset.from_list(TASKS[task].make(split, n, seed))


def eval_prompts(task: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Held-out ``(question, reference answer)`` pairs."""
    return [(ex["messages"][0]["content"], ex["messages"][1]["content"]) for ex in TASKS[task].make("eval", n, seed)]


def score(task: str, prompt: str, answer: str, response: str) -> float:
    """1.0 if ``response`` solves the held-out ``prompt`` (reference ``answer``), else 0.0."""
    return TASKS[task].scorer(prompt, answer, response)


def score_doc(task: str, doc: dict, response: str) -> float:
    """:func:`score` of an lm_eval document (``{"prompt", "answer"}``): the demo tasks' scorer."""
    return score(task, doc["prompt"], doc["answer"], response)
