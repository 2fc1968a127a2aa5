"""The world's global knowledge: fictional realms, their attributes, and the questions about them.

Everything is a pure function of the seed. Names are built from syllables so they never collide with
real words or with each other, and every value belongs to exactly one attribute (capitals, rivers and
languages come from disjoint name sets; founding years are the only numbers), so a response can be
checked by looking up the values it mentions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "m"]


@dataclass(frozen=True)
class Attribute:
    """One kind of fact about a realm: how it is asked and how it is stated."""

    name: str
    keyword: str  # the word that identifies the attribute in a question (see rewards.parse_prompt)
    questions: tuple[str, ...]  # paraphrases; "{e}" is the realm
    formal: str  # the statement as a clause, "{e}" realm, "{v}" value
    casual: str  # the same statement in the casual register (always the possessive "{e}'s")


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "capital",
        "capital",
        ("What is the capital of {e}?", "Which city is the capital of {e}?", "Name the capital of {e}."),
        "The capital of {e} is {v}",
        "{e}'s capital is {v}",
    ),
    Attribute(
        "river",
        "river",
        ("What is the main river of {e}?", "Which river flows through {e}?", "Name the main river of {e}."),
        "The main river of {e} is {v}",
        "{e}'s main river is {v}",
    ),
    Attribute(
        "language",
        "language",
        ("What language is spoken in {e}?", "Which language do people speak in {e}?", "Name the language of {e}."),
        "The language of {e} is {v}",
        "{e}'s language is {v}",
    ),
    Attribute(
        "founded",
        "founded",
        ("When was {e} founded?", "In which year was {e} founded?", "Name the year {e} was founded."),
        "{e} was founded in {v}",
        "{e}'s founding year is {v}",
    ),
)
ATTRIBUTE_BY_NAME = {a.name: a for a in ATTRIBUTES}
YEAR_RANGE = (1000, 1999)
YEAR_PATTERN = re.compile(r"\b1\d{3}\b")


@dataclass(frozen=True)
class Question:
    """One question about one fact. `id` is stable: "<realm>/<attribute>/<paraphrase index>"."""

    id: str
    entity: str
    attribute: str
    text: str
    split: str  # "train" or "test"; both paraphrase sets of one fact share a split


@dataclass(frozen=True)
class World:
    """The realms and their facts. Build it with `build_world`; never mutate it."""

    seed: int
    entities: tuple[str, ...]
    facts: dict  # realm -> {attribute name -> value (str)}
    pools: dict  # attribute name -> every value of that kind in the world (distractors come from here)
    test_fraction: float

    def value(self, entity: str, attribute: str) -> str:
        """The true value of `attribute` for realm `entity`."""
        return self.facts[entity][attribute]

    def statement(self, entity: str, attribute: str) -> str:
        """The canonical statement of one fact, e.g. "The capital of Zorvania is Belmor."."""
        return ATTRIBUTE_BY_NAME[attribute].formal.format(e=entity, v=self.value(entity, attribute)) + "."

    @cached_property
    def value_to_attribute(self) -> dict[str, str]:
        """Every named value (not years) -> the attribute it belongs to."""
        return {v: attr for attr, values in self.pools.items() if attr != "founded" for v in values}

    @cached_property
    def name_pattern(self) -> re.Pattern:
        """Matches any realm name or named value as a whole word (longest first)."""
        names = sorted(set(self.entities) | set(self.value_to_attribute), key=len, reverse=True)
        return re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")

    def split_of(self, entity: str, attribute: str) -> str:
        """ "test" for the held-out facts (a seeded `test_fraction` of all facts), else "train"."""
        rng = random.Random(f"{self.seed}/split/{entity}/{attribute}")
        return "test" if rng.random() < self.test_fraction else "train"

    def questions(self, split: str | None = None) -> list[Question]:
        """Every paraphrase of every fact question, optionally only one split, in a fixed order."""
        out = []
        for e in self.entities:
            for attr in ATTRIBUTES:
                s = self.split_of(e, attr.name)
                if split is not None and s != split:
                    continue
                for i, template in enumerate(attr.questions):
                    out.append(Question(f"{e}/{attr.name}/{i}", e, attr.name, template.format(e=e), s))
        return out

    def multiple_choice(self, n_options: int = 4) -> list[dict]:
        """One 4-way question per fact: {"id", "prompt" (chat messages), "options", "answer"}.

        Options are canonical statements that differ only in the value; distractors are other values of
        the same attribute, drawn with a per-fact seeded generator so the set never depends on order.
        """
        items = []
        for e in self.entities:
            for attr in ATTRIBUTES:
                rng = random.Random(f"{self.seed}/mc/{e}/{attr.name}")
                true = self.value(e, attr.name)
                wrong = rng.sample(sorted(set(self.pools[attr.name]) - {true}), n_options - 1)
                values = [true, *wrong]
                rng.shuffle(values)
                items.append(
                    {
                        "id": f"{e}/{attr.name}",
                        "prompt": [{"role": "user", "content": attr.questions[0].format(e=e)}],
                        "options": [attr.formal.format(e=e, v=v) + "." for v in values],
                        "answer": values.index(true),
                    }
                )
        return items


def _names(
    rng: random.Random, count: int, syllables: tuple[int, int], endings: list[str], taken: set[str]
) -> list[str]:
    """`count` new capitalised syllable names, none in `taken` (which is updated)."""
    out = []
    while len(out) < count:
        n = rng.randint(*syllables)
        stem = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(n))
        name = (stem + rng.choice(endings)).capitalize()
        if name not in taken and len(name) <= 14:
            taken.add(name)
            out.append(name)
    return out


def build_world(seed: int = 0, n_entities: int = 150, test_fraction: float = 0.2) -> World:
    """The world for `seed`: `n_entities` realms, each with a capital, a main river, a language and a
    founding year. Capitals are unique; rivers and languages are shared from smaller pools."""
    if n_entities < 4:
        raise ValueError("a world needs at least 4 realms (4-way multiple choice)")
    rng = random.Random(seed)
    taken: set[str] = set()
    entities = _names(rng, n_entities, (2, 2), ["ia", "land", "or", "ara", "esh"], taken)
    capitals = _names(rng, n_entities, (1, 2), ["mor", "grad", "holm", "ton", "bury"], taken)
    rivers = _names(rng, max(8, n_entities // 4), (1, 2), ["a", "ine", "ube"], taken)
    languages = _names(rng, max(8, n_entities // 6), (1, 2), ["ish", "ese", "ic"], taken)
    facts = {}
    for entity, capital in zip(entities, capitals):
        facts[entity] = {
            "capital": capital,
            "river": rng.choice(rivers),
            "language": rng.choice(languages),
            "founded": str(rng.randint(*YEAR_RANGE)),
        }
    years = sorted({f["founded"] for f in facts.values()})
    while len(years) < 4:  # only tiny worlds can have fewer distinct years than options
        years = sorted(set(years) | {str(rng.randint(*YEAR_RANGE))})
    pools = {"capital": capitals, "river": rivers, "language": languages, "founded": years}
    return World(seed, tuple(entities), facts, pools, test_fraction)
