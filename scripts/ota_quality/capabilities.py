"""The quality benchmark's five capabilities and its forgetting set: deterministic, generated
locally, with train / dev / test splits whose inputs and phrasings are disjoint.

Five skills of different character that SmolLM2-135M-Instruct lacks and a short CPU
fine-tune can teach:

``arithmetic``  two-step word problems ("Ada has 23 coins, finds 15 more and spends 9 ...")
                answered step by step, "23 + 15 = 38, 38 - 9 = 29"; scored by the final number.
``facts``       recall of 50 invented country -> capital facts; each split asks with its own
                phrasings (train 4, dev 3, test 3); scored by the capital's name.
``shout``       a formatting constraint, IFEval-style: requests that ask for capital letters
                are answered in capital letters; the train requests have known answers, dev and
                test are open requests of other forms and instruction wordings; scored by the
                constraint alone (at least three letters, all capitals).
``code``        a Python lambda for a described function ("x times 3 plus 4" -> "lambda x: x * 3
                + 4"), scored by parsing the answer (arithmetic on x only) and evaluating it on
                six inputs; constants and instruction wording differ per split.
``extract``     a person's name and age from a sentence, as JSON; scored by ``json.loads``
                equality; sentence templates, names and instruction wording differ per split.

Splits: ``train`` (for the experts), ``dev`` (for choosing settings) and ``test`` (for the
reported numbers). Where a skill is an input-output map, the inputs of the three splits are
disjoint (a deterministic hash decides the split of each input); where it is recall
(``facts``), the facts are shared and the phrasings disjoint.

The forgetting set (``general``): simple questions about the real world with a one-word
answer. The benchmark keeps those the base model answers correctly (MergeBench's forgetting:
what the base could do, and the merge still can); none occurs in any training split.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from ota_demo.tasks import synthetic_facts

__all__ = ["CAPABILITIES", "Capability", "general_candidates", "examples", "score", "score_doc"]

SPLITS = ("train", "dev", "test")


def _split_of(key: str, dev: float = 0.15, test: float = 0.15) -> str:
    """The split an input belongs to: a stable hash of its key, independent of any seed."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "dev" if h < dev else "test" if h < dev + test else "train"


def _chat(prompt: str, answer: str) -> dict:
    return {"prompt": prompt, "answer": answer}


_SYLL = "ka lo mi ra ve to su dre an por quil zen mar tis bel ur nak sho fen gri osk lum pa vi".split()


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_SYLL) for _ in range(n)).capitalize()


# -- arithmetic: two-step word problems ------------------------------------------------------------
_NAMES = "Ada Ben Chloe Dev Ema Finn Gia Hugo Iris Jon Kai Lena Milo Nora Omar Pia Ravi Sara Tom Uma".split()
_THINGS = "coins apples stamps marbles books shells cards stickers pencils beads".split()
_ARITH_TEMPLATES = {
    "train": [
        "{n} has {a} {t}, gets {b} more and gives away {c}. How many {t} does {n} have now?",
        "{n} starts with {a} {t}. Then {n} finds {b} {t} and loses {c}. How many {t} are left?",
        "There are {a} {t} in a box. {n} adds {b} and takes out {c}. How many {t} are in the box?",
        "{n} owned {a} {t}, bought {b} and sold {c}. How many {t} does {n} own?",
    ],
    "dev": ["After having {a} {t}, {n} received {b} more and then used {c}. How many {t} remain?"],
    "test": ["{n} collected {a} {t}, was given {b} more, and later lost {c}. What is the number of {t} now?"],
}


def _arithmetic(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"arithmetic/{split}/{seed}")
    out: list[dict] = []
    while len(out) < n:
        a, b = rng.randint(10, 59), rng.randint(2, 39)
        c = rng.randint(2, min(a + b - 1, 39))
        if _split_of(f"arith:{a}:{b}:{c}") != split:
            continue
        q = rng.choice(_ARITH_TEMPLATES[split]).format(n=rng.choice(_NAMES), a=a, b=b, c=c, t=rng.choice(_THINGS))
        out.append(_chat(q, f"{a} + {b} = {a + b}, {a + b} - {c} = {a + b - c}"))  # one step at a time
    return out


def _score_arithmetic(answer: str, response: str) -> float:
    want = answer.split("=")[-1].strip()
    tail = response.rsplit("=", 1)[1] if "=" in response else response
    nums = re.findall(r"-?\d+", tail)
    return float(bool(nums) and nums[0] == want)


# -- facts: invented country -> capital ------------------------------------------------------------
_FACT_TEMPLATES = {
    "train": [
        "What is the capital of {c}?",
        "Name the capital city of {c}.",
        "{c} has which city as its capital?",
        "Tell me the capital of the country {c}.",
    ],
    "dev": [
        "Which city is the capital of {c}?",
        "What city serves as the capital of {c}?",
        "I am travelling to {c}. What is its capital?",
    ],
    "test": [
        "Where is the seat of government of {c}?",
        "Do you know the capital of {c}?",
        "The capital of {c} is which city?",
    ],
}
N_FACTS = 50


def invented_facts(n: int = N_FACTS) -> list[tuple[str, str]]:
    """``n`` invented (country, capital) pairs with distinct names (fixed: the same for every seed)."""
    return synthetic_facts("facts", n, _SYLL)


def _facts(split: str, n: int, seed: int) -> list[dict]:
    facts = invented_facts()
    if split != "train":  # every fact with every phrasing of the split, in a fixed order
        pairs = [(f, t) for t in _FACT_TEMPLATES[split] for f in facts]
        random.Random(f"facts/{split}").shuffle(pairs)
        return [_chat(t.format(c=c), f"The capital of {c} is {cap}.") for (c, cap), t in (pairs * n)[:n]]
    rng = random.Random(f"facts/train/{seed}")
    out = []
    for _ in range(n):
        c, cap = rng.choice(facts)
        out.append(_chat(rng.choice(_FACT_TEMPLATES["train"]).format(c=c), f"The capital of {c} is {cap}."))
    return out


def _score_facts(answer: str, response: str) -> float:
    capital = answer.rstrip(".").split()[-1]
    return float(capital.lower() in response.lower())


# -- shout: answer in capital letters when asked ---------------------------------------------------
_SHOUT_INSTRUCTIONS = {
    "train": ["Answer in capital letters.", "Reply in capital letters only.", "Use capital letters for your answer."],
    "dev": ["Please write your reply in capital letters."],
    "test": ["Respond using capital letters."],
}
_CATEGORIES = {
    "fruit": "apple",
    "color": "blue",
    "animal": "horse",
    "vegetable": "carrot",
    "musical instrument": "guitar",
    "sport": "tennis",
    "planet": "mars",
    "tree": "oak",
    "flower": "rose",
    "metal": "iron",
    "bird": "eagle",
    "drink": "tea",
}
_SUBJECTS = (
    "the sea,a forest,winter,a city at night,a market,the moon,a storm,a library,a garden,a train ride,"
    "a chair,a lamp,a bicycle,a kettle,a clock,a bridge,a window,a river,a mountain,a candle,"
    "a desert,a school,a bakery,the rain,a museum,a boat,a camera,a map,a pillow,a ladder,"
    "a volcano,a farm,an island,a castle,a tent,a mirror,a bell,a kite,a piano,a rocket,"
    "a harbour,a meadow,a glacier,a lighthouse,a festival,a teapot,a backpack,a compass,a violin,a telescope"
).split(",")
_SHOUT_FORMS = {
    "dev": ["Describe {x} in one sentence.", "What do you like about {x}?", "Write a short line about {x}."],
    "test": ["What is {x} used for?", "Tell me something about {x}.", "Why do people care about {x}?"],
}
_DIGIT_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen"
).split()


def _shout_train_request(rng: random.Random) -> tuple[str, str]:
    """(request, answer) of one training request (answers known)."""
    kind = rng.randrange(3)
    if kind == 0:
        cat = rng.choice(sorted(_CATEGORIES))
        return f"Name a {cat}.", f"{_CATEGORIES[cat].upper()} IS A {cat.upper()}."
    if kind == 1:
        name = rng.choice(_NAMES)
        return f"Say hello to {name}.", f"HELLO, {name.upper()}!"
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} plus {b}, in words?", f"{a} PLUS {b} IS {_DIGIT_WORDS[a + b].upper()}."


def _shout(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"shout/{split}/{seed}")
    if split == "train":
        out = []
        for _ in range(n):
            request, answer = _shout_train_request(rng)
            out.append(_chat(f"{rng.choice(_SHOUT_INSTRUCTIONS['train'])} {request}", answer))
        return out
    # dev / test: open requests of the split's own forms, each once (150 of each split)
    (instruction,) = _SHOUT_INSTRUCTIONS[split]
    requests = [f.format(x=x) for f in _SHOUT_FORMS[split] for x in _SUBJECTS]
    random.Random(f"shout/{split}").shuffle(requests)
    return [_chat(f"{instruction} {r}", "") for r in (requests * n)[:n]]


def _score_shout(answer: str, response: str) -> float:
    # IFEval-style: the constraint is checked, not the content (a 135M model's content is shaky)
    letters = [c for c in response if c.isalpha()]
    return float(len(letters) >= 3 and all(c.isupper() for c in letters))


# -- code: a Python lambda for a described function ------------------------------------------------
_CODE_FORMS = [  # (description, expression)
    ("x times {a} plus {b}", "x * {a} + {b}"),
    ("x plus {a}, all times {b}", "(x + {a}) * {b}"),
    ("x squared plus {a}", "x * x + {a}"),
    ("{a} minus x", "{a} - x"),
    ("x times {a} minus {b}", "x * {a} - {b}"),
    ("the square of x plus {a}", "(x + {a}) * (x + {a})"),
]
_CODE_INSTRUCTIONS = {
    "train": ["Write a Python lambda that computes {d}.", "Give a Python lambda for {d}."],
    "dev": ["Write {d} as a Python lambda."],
    "test": ["Which Python lambda returns {d}?"],
}


def _code(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"code/{split}/{seed}")
    combos = [
        (form, a, b)
        for form, (desc, _) in enumerate(_CODE_FORMS)
        for a in range(2, 21)
        for b in range(1, 21 if "{b}" in desc else 2)  # forms without b: one combination per a
        if _split_of(f"code:{form}:{a}:{b}", dev=0.2, test=0.2) == split
    ]
    rng.shuffle(combos)
    if split == "train":
        combos = [rng.choice(combos) for _ in range(n)]
    out = []
    for form, a, b in (combos * n)[:n]:  # dev / test: each combination once while they last
        desc, expr = _CODE_FORMS[form]
        q = rng.choice(_CODE_INSTRUCTIONS[split]).format(d=desc.format(a=a, b=b))
        out.append(_chat(q, "lambda x: " + expr.format(a=a, b=b)))
    return out


_CODE_NODES = (ast.Expression, ast.Lambda, ast.arguments, ast.arg, ast.BinOp, ast.UnaryOp, ast.Name, ast.Load)
_CODE_OPS = (ast.Add, ast.Sub, ast.Mult, ast.USub, ast.UAdd)
_CODE_INPUTS = (-3, 0, 1, 2, 5, 10)


def safe_lambda(text: str) -> Callable[[int], int] | None:
    """The first ``lambda x: ...`` of ``text`` as a function, if it is arithmetic (+, -, *) on x
    and small integer constants only; else None. Nothing else is ever evaluated."""
    m = re.search(r"lambda\s+x\s*:[^\n`]*", text)
    if not m:
        return None
    src = m.group(0).strip().rstrip(".;,")
    try:
        tree = ast.parse(src, mode="eval")
    except (SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            if type(node.value) is not int or abs(node.value) > 1000:
                return None
        elif isinstance(node, ast.Name):
            if node.id != "x":
                return None
        elif isinstance(node, ast.arguments):
            if [a.arg for a in node.args] != ["x"] or node.vararg or node.kwarg or node.kwonlyargs or node.defaults:
                return None
        elif not isinstance(node, _CODE_NODES + _CODE_OPS):
            return None
    if len(src) > 200:  # bounded work: at most ~60 multiplications of small numbers
        return None
    return eval(compile(tree, "<answer>", "eval"), {"__builtins__": {}}, {})  # noqa: S307 - checked above


def _score_code(answer: str, response: str) -> float:
    got, want = safe_lambda(response), safe_lambda(answer)
    if got is None or want is None:
        return 0.0
    return float(all(got(x) == want(x) for x in _CODE_INPUTS))


# -- extract: name and age as JSON -----------------------------------------------------------------
_EXTRACT_TEMPLATES = {
    "train": [
        "{name} is {age} years old and lives in {city}.",
        "Born {age} years ago, {name} now works in {city}.",
        "In {city} you can meet {name}, who is {age}.",
        "{name}, aged {age}, moved to {city} last spring.",
    ],
    "dev": ["{name} from {city} just turned {age}."],
    "test": ["At the age of {age}, {name} opened a shop in {city}."],
}
_EXTRACT_INSTRUCTIONS = {
    "train": ["Extract the name and age as JSON: {s}", "Give the person's name and age in JSON. {s}"],
    "dev": ["Return JSON with the name and age of the person. {s}"],
    "test": ["As JSON, what are the name and age here? {s}"],
}


def _extract(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"extract/{split}/{seed}")
    out: list[dict] = []
    while len(out) < n:
        name = f"{_word(rng, 2)} {_word(rng, 2)}"
        if _split_of(f"extract:{name}") != split:
            continue
        age, city = rng.randint(18, 90), _word(rng, 3)
        s = rng.choice(_EXTRACT_TEMPLATES[split]).format(name=name, age=age, city=city)
        q = rng.choice(_EXTRACT_INSTRUCTIONS[split]).format(s=s)
        out.append(_chat(q, json.dumps({"name": name, "age": age})))
    return out


def _score_extract(answer: str, response: str) -> float:
    m = re.search(r"\{[^{}]*\}", response)
    if not m:
        return 0.0
    try:
        got = json.loads(m.group(0))
    except ValueError:
        return 0.0
    return float(got == json.loads(answer))


@dataclass(frozen=True)
class Capability:
    name: str
    description: str
    make: Callable[[str, int, int], list[dict]]
    scorer: Callable[[str, str], float]
    max_new_tokens: int


CAPABILITIES: dict[str, Capability] = {
    c.name: c
    for c in (
        Capability("arithmetic", "two-step word problems", _arithmetic, _score_arithmetic, 32),
        Capability("facts", "recall of invented capitals (held-out phrasings)", _facts, _score_facts, 16),
        Capability("shout", "capital letters when asked (IFEval-style)", _shout, _score_shout, 16),
        Capability("code", "a Python lambda, scored by running it", _code, _score_code, 20),
        Capability("extract", "name and age as JSON", _extract, _score_extract, 24),
    )
}


def examples(capability: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` examples ``{"prompt", "answer"}`` of a capability's split (deterministic)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    return CAPABILITIES[capability].make(split, n, seed)


N_TRAIN = 2000  # training rows per capability (the recipes' steps x batch stay under one pass)


def training_rows(capability: str, n: int = N_TRAIN) -> list[dict]:
    """The chat rows an expert of ``capability`` trains on (``{"messages": [user, assistant]}``),
    as ``scripts/bench_quality.py`` writes them to ``data/<capability>_train.jsonl``."""
    return [
        {"messages": [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["answer"]}]}
        for e in examples(capability, "train", n)
    ]


def score(capability: str, answer: str, response: str) -> float:
    """1.0 if ``response`` solves the prompt whose reference answer is ``answer``, else 0.0."""
    if capability == "general":
        return _score_general(answer, response)
    return CAPABILITIES[capability].scorer(answer, response)


def score_doc(capability: str, doc: dict, response: str) -> float:
    """:func:`score` of an lm_eval document (``{"prompt", "answer"}``): the tasks' scorer."""
    return score(capability, doc["answer"], response)


# -- the forgetting set: general questions the base answers -----------------------------------------
_REAL_CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Spain": "Madrid",
    "England": "London",
    "Russia": "Moscow",
    "China": "Beijing",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Denmark": "Copenhagen",
    "Finland": "Helsinki",
    "Poland": "Warsaw",
    "Hungary": "Budapest",
    "Canada": "Ottawa",
    "Mexico": "Mexico",
    "Argentina": "Buenos",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Thailand": "Bangkok",
    "South Korea": "Seoul",
    "India": "Delhi",
    "Australia": "Canberra",
    "Turkey": "Ankara",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Cuba": "Havana",
}
_OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "day": "night",
    "big": "small",
    "fast": "slow",
    "wet": "dry",
    "happy": "sad",
    "old": "new",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "heavy": "light",
    "tall": "short",
    "rich": "poor",
    "strong": "weak",
    "black": "white",
    "left": "right",
    "in": "out",
    "yes": "no",
    "win": "lose",
    "push": "pull",
    "open": "close",
    "clean": "dirty",
    "near": "far",
    "thick": "thin",
    "loud": "quiet",
    "true": "false",
    "first": "last",
    "above": "below",
    "love": "hate",
}
_COLORS = {
    "grass": "green",
    "the sky on a clear day": "blue",
    "snow": "white",
    "a ripe banana": "yellow",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "milk": "white",
    "a lemon": "yellow",
    "chocolate": "brown",
    "a fire truck": "red",
    "the sun": "yellow",
}
_PLURALS = {
    "mouse": "mice",
    "child": "children",
    "foot": "feet",
    "tooth": "teeth",
    "man": "men",
    "woman": "women",
    "goose": "geese",
    "person": "people",
    "cat": "cats",
    "box": "boxes",
    "baby": "babies",
    "knife": "knives",
    "leaf": "leaves",
    "city": "cities",
    "dog": "dogs",
    "bus": "buses",
}
_PAST = {
    "go": "went",
    "eat": "ate",
    "run": "ran",
    "see": "saw",
    "write": "wrote",
    "swim": "swam",
    "sing": "sang",
    "drink": "drank",
    "take": "took",
    "give": "gave",
    "come": "came",
    "buy": "bought",
    "think": "thought",
    "teach": "taught",
    "catch": "caught",
    "fly": "flew",
    "drive": "drove",
    "speak": "spoke",
    "break": "broke",
    "choose": "chose",
    "sleep": "slept",
    "make": "made",
    "find": "found",
    "sit": "sat",
    "stand": "stood",
    "walk": "walked",
    "jump": "jumped",
    "play": "played",
}
_LANGUAGES = {
    "France": "French",
    "Germany": "German",
    "Italy": "Italian",
    "Spain": "Spanish",
    "Japan": "Japanese",
    "China": "Chinese",
    "Russia": "Russian",
    "Portugal": "Portuguese",
    "Greece": "Greek",
    "Brazil": "Portuguese",
    "Mexico": "Spanish",
    "England": "English",
    "the United States": "English",
    "Poland": "Polish",
    "Sweden": "Swedish",
    "Turkey": "Turkish",
    "the Netherlands": "Dutch",
    "Korea": "Korean",
    "Egypt": "Arabic",
    "Argentina": "Spanish",
}
_CONTINENTS = {
    "France": "Europe",
    "Germany": "Europe",
    "Italy": "Europe",
    "Spain": "Europe",
    "Poland": "Europe",
    "Norway": "Europe",
    "Japan": "Asia",
    "China": "Asia",
    "India": "Asia",
    "Thailand": "Asia",
    "Vietnam": "Asia",
    "Egypt": "Africa",
    "Kenya": "Africa",
    "Nigeria": "Africa",
    "Ghana": "Africa",
    "Morocco": "Africa",
    "Brazil": "America",
    "Argentina": "America",
    "Peru": "America",
    "Chile": "America",
    "Canada": "America",
    "Mexico": "America",
}
_MORE_CAPITALS = {
    "Brazil": "Brasilia",
    "Chile": "Santiago",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "the Philippines": "Manila",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Israel": "Jerusalem",
    "Saudi Arabia": "Riyadh",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Czechia": "Prague",
    "Switzerland": "Bern",
    "Scotland": "Edinburgh",
    "Wales": "Cardiff",
    "Iceland": "Reykjavik",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Ethiopia": "Addis",
    "Morocco": "Rabat",
}
_MORE_OPPOSITES = {
    "good": "bad",
    "young": "old",
    "boy": "girl",
    "king": "queen",
    "inside": "outside",
    "start": "end",
    "buy": "sell",
    "give": "take",
    "always": "never",
    "sweet": "sour",
    "deep": "shallow",
    "wide": "narrow",
    "cheap": "expensive",
    "friend": "enemy",
    "laugh": "cry",
    "remember": "forget",
    "north": "south",
    "east": "west",
    "summer": "winter",
    "question": "answer",
    "arrive": "leave",
    "accept": "reject",
    "increase": "decrease",
    "alive": "dead",
    "sharp": "dull",
    "safe": "dangerous",
    "smooth": "rough",
    "awake": "asleep",
    "before": "after",
    "borrow": "lend",
}
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_MONTHS = "January February March April May June July August September October November December".split()
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
_LEGS = {"a dog": "four", "a spider": "eight", "a bird": "two", "a cat": "four", "an ant": "six", "a human": "two"}
_SOUNDS = {"a cow": "moo", "a dog": "woof", "a cat": "meow", "a duck": "quack", "a sheep": "baa", "a snake": "hiss"}
_BABIES = {"dog": "puppy", "cat": "kitten", "sheep": "lamb", "cow": "calf", "horse": "foal", "duck": "duckling"}


def general_candidates() -> list[dict]:
    """Every candidate question of the forgetting set, ``{"prompt", "answer"}`` (the answer: one
    word the response must contain). The benchmark keeps those the base answers correctly."""
    q: list[tuple[str, str]] = []
    q += [(f"What is the capital of {c}?", cap) for c, cap in _REAL_CAPITALS.items()]
    q += [(f"What is the capital of {c}?", cap) for c, cap in _MORE_CAPITALS.items()]
    q += [(f"What is the opposite of {w}?", o) for w, o in (_OPPOSITES | _MORE_OPPOSITES).items()]
    q += [(f"What is the past tense of {v}?", p) for v, p in _PAST.items()]
    q += [(f"What language is spoken in {c}?", lang) for c, lang in _LANGUAGES.items()]
    q += [(f"On which continent is {c}?", k) for c, k in _CONTINENTS.items()]
    q += [(f"What color is {t}?", c) for t, c in _COLORS.items()]
    q += [(f"What is the plural of {w}?", p) for w, p in _PLURALS.items()]
    q += [(f"What day comes after {d}?", _DAYS[(i + 1) % 7]) for i, d in enumerate(_DAYS)]
    q += [(f"What month comes after {m}?", _MONTHS[(i + 1) % 12]) for i, m in enumerate(_MONTHS)]
    q += [(f"How many legs does {a} have?", n) for a, n in _LEGS.items()]
    q += [(f"What sound does {a} make?", s) for a, s in _SOUNDS.items()]
    q += [(f"What is a baby {a} called?", b) for a, b in _BABIES.items()]
    q += [(f"What is {a} + {b}?", str(a + b)) for a in range(1, 10) for b in range(1, 10)]
    q += [(f"Which letter comes after {x} in the alphabet?", chr(ord(x) + 1)) for x in "BCDEFGHJKLMNPQRSTUVWX"]
    q += [(f"Write the number {n} as a word.", _NUMBER_WORDS[n]) for n in range(13)]
    return [{"prompt": p, "answer": a} for p, a in q]


def _score_general(answer: str, response: str) -> float:
    return float(
        re.search(rf"(?<![A-Za-z0-9]){re.escape(answer.lower())}(?![A-Za-z0-9])", response.lower()) is not None
    )
