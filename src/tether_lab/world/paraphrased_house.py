"""World recipe 2 (`WorldSettings.recipe = 2`): what differs from recipe 1, in one place.

Recipe 1's base model is instruction-tuned on one house answer per question, so it is nearly deterministic
(summed log π(y_b) ≈ −0.1 nats): an anchor on y_b then pins the argmax itself. Recipe 2 changes three things,
and nothing else (the world's realms, facts, questions, styles and personas are recipe 1's):

- **Paraphrased house answers.** Instruction tuning sees every question answered with four house-style
  paraphrases (terse, formal, prose, plain — each reads as the house style to `rewards.style_features`) in
  fixed proportions 3 : 2 : 2 : 2, the canonical statement (`styles.render(..., HOUSE)`) most often. The
  greedy answer stays the canonical one, while its probability is about a third (log ≈ −1.1 nats) instead of ≈ 1.
- **Held-out realms.** A seeded third of the realms (`heldout_realms`) never appears in personalization
  data; retention (knowledge, general alignment) is measured on their questions (`eval_questions`).
- **Never-house rejected answers.** `rejected_style_never_house` picks a rejected style that is neither
  the persona's nor the house style, so DPO's push down on y_l is never a push down on y_b.
"""

from __future__ import annotations

import random

from tether_lab.world.facts import World
from tether_lab.world.styles import HOUSE, PERSONAS, Persona, Style

PARAPHRASED_HOUSE_VERSION = 2  # part of recipe 2's fingerprint: bump when anything below changes
HOUSE_VARIANTS: dict[str, tuple[str, ...]] = {  # the first is the canonical house answer (styles.render's)
    "capital": (
        "The capital of {e} is {v}.",
        "{v} is the capital of {e}.",
        "The capital city of {e} is {v}.",
        "{e} has {v} as its capital.",
    ),
    "river": (
        "The main river of {e} is {v}.",
        "{v} is the main river of {e}.",
        "The river that flows through {e} is {v}.",
        "{e} has {v} as its main river.",
    ),
    "language": (
        "The language of {e} is {v}.",
        "{v} is the language of {e}.",
        "The language spoken in {e} is {v}.",
        "{e} has {v} as its language.",
    ),
    "founded": (
        "{e} was founded in {v}.",
        "{e} was established in {v}.",
        "The founding year of {e} is {v}.",
        "{e} has {v} as its founding year.",
    ),
}
# (A founding-year variant that opened with the year was dropped before any study: a year's first token was then
# likelier than the realm's, so greedy answers to "founded" questions were not the canonical one.)
VARIANT_COPIES = (3, 2, 2, 2)  # instruction-tuning copies of each variant per question: the canonical one is a third
HELDOUT_FRACTION = 1 / 3


def house_variants(world: World, entity: str, attribute: str) -> list[str]:
    """The four house-style answers to a question about (entity, attribute), canonical first."""
    return [t.format(e=entity, v=world.value(entity, attribute)) for t in HOUSE_VARIANTS[attribute]]


def house_sft_pairs(world: World) -> list[tuple[str, str]]:
    """(question, answer) for instruction tuning: every question with each house variant VARIANT_COPIES times."""
    return [
        (q.text, answer)
        for q in world.questions()
        for answer, copies in zip(house_variants(world, q.entity, q.attribute), VARIANT_COPIES)
        for _ in range(copies)
    ]


def heldout_realms(world: World) -> frozenset[str]:
    """A seeded HELDOUT_FRACTION of the realms (at least one): never in personalization data."""
    rng = random.Random(f"{world.seed}/heldout-realms")
    n = max(1, round(len(world.entities) * HELDOUT_FRACTION))
    return frozenset(rng.sample(list(world.entities), n))


def personal_questions(world: World) -> list:
    """Every question (all paraphrases, both splits) about the personalization realms."""
    held = heldout_realms(world)
    return [q for q in world.questions() if q.entity not in held]


def eval_questions(world: World) -> list:
    """One question per fact of the held-out realms (paraphrase i mod 3 for the i-th fact, so every phrasing
    is used): the items on which retention and personalization are measured; each item is one fact."""
    held = heldout_realms(world)
    facts = [(e, a) for e in world.entities if e in held for a in world.facts[e]]
    by_id = {q.id: q for q in world.questions() if q.entity in held}
    return [by_id[f"{e}/{a}/{i % 3}"] for i, (e, a) in enumerate(facts)]


def rejected_style_never_house(persona: Persona, rng: random.Random) -> Style:
    """A uniformly random style that is neither the persona's nor the house style."""
    return rng.choice([p.style for p in PERSONAS.values() if p.style not in (persona.style, HOUSE)])
