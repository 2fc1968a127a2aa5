"""Personas defined by an instruction, for any chat model: personalization data from the model itself.

For a prompt WITHOUT the instruction, the chosen response is what the model writes WITH the persona's
instruction (as a system message), the rejected one its default answer. Each persona has a programmatic score
of a response in [0, 1] (higher = more in the persona's style) so that personalization is measured without a
judge model; `tests/test_instructed.py` checks every score on hand-written examples.

    concise       1 at ≤ 10 words, falling linearly to 0 at 100 words
    simple        Flesch reading ease / 100, clipped to [0, 1] (short sentences, short words)
    enthusiastic  ½·min(1, exclamation marks per sentence) + ½·min(1, enthusiasm words per 20 words)
    formal        1 − min(1, informal markers (contractions, "!", casual words) per 20 words)

Prompts: `general_prompts` (200 about 50 everyday topics, the BAPO study's) and `prompt_pool` (the BPO chat study's:
over 250 topics in 8 templates, split by a data seed into training, dev and test topics). `InstructedOracle` is a
persona's score as a preference oracle, registered as `instructed:NAME` (`tether online --oracle instructed:simple`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tether.config import TetherError
from tether.oracles import Oracle

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")
_CONTRACTION = re.compile(r"\b\w+'(s|re|ve|ll|d|t|m)\b", re.IGNORECASE)
ENTHUSIASM = {
    "amazing",
    "awesome",
    "exciting",
    "excited",
    "fantastic",
    "wonderful",
    "love",
    "great",
    "incredible",
    "wow",
    "fun",
    "thrilled",
    "brilliant",
    "delightful",
    "super",
    "absolutely",
    "magical",
    "cool",
}
CASUAL = {
    "hey",
    "yeah",
    "gonna",
    "wanna",
    "kinda",
    "cool",
    "stuff",
    "guys",
    "okay",
    "ok",
    "wow",
    "awesome",
    "super",
    "pretty",
}


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in (m.strip() for m in _SENTENCE.findall(text)) if words(s)]


def syllables(word: str) -> int:
    """A vowel-group count, the usual heuristic (a silent final e dropped), at least 1."""
    w = word.lower().strip("'-")
    groups = re.findall(r"[aeiouy]+", w)
    n = len(groups) - (1 if w.endswith("e") and not w.endswith(("le", "ee")) and len(groups) > 1 else 0)
    return max(1, n)


def concise_score(text: str) -> float:
    return min(1.0, max(0.0, 1.0 - (len(words(text)) - 10) / 90))


def simple_score(text: str) -> float:
    ws, ss = words(text), sentences(text)
    if not ws:
        return 0.0
    ease = 206.835 - 1.015 * len(ws) / max(1, len(ss)) - 84.6 * sum(map(syllables, ws)) / len(ws)
    return min(1.0, max(0.0, ease / 100))


def enthusiastic_score(text: str) -> float:
    ws, ss = words(text), sentences(text)
    if not ws:
        return 0.0
    bangs = text.count("!") / max(1, len(ss))
    keen = sum(w.lower() in ENTHUSIASM for w in ws) / len(ws) * 20
    return 0.5 * min(1.0, bangs) + 0.5 * min(1.0, keen)


def formal_score(text: str) -> float:
    ws = words(text)
    if not ws:
        return 0.0
    informal = len(_CONTRACTION.findall(text)) + text.count("!") + sum(w.lower() in CASUAL for w in ws)
    return 1.0 - min(1.0, informal / len(ws) * 20)


@dataclass(frozen=True)
class InstructedPersona:
    name: str
    instruction: str
    score: Callable[[str], float]

    def messages(self, prompt: list[dict]) -> list[dict]:
        """The prompt with the persona's instruction as a system message in front."""
        return [{"role": "system", "content": self.instruction}, *prompt]


PERSONAS = {
    p.name: p
    for p in (
        InstructedPersona("concise", "Answer in one or two short sentences.", concise_score),
        InstructedPersona(
            "simple", "Explain it to a ten-year-old child, using short sentences and simple words.", simple_score
        ),
        InstructedPersona("enthusiastic", "Answer with lots of enthusiasm and exclamation marks!", enthusiastic_score),
        InstructedPersona("formal", "Answer in a formal, academic tone, without contractions.", formal_score),
    )
}

TOPICS = (
    "photosynthesis",
    "rainbows",
    "volcanoes",
    "the water cycle",
    "gravity",
    "vaccines",
    "the internet",
    "electricity",
    "earthquakes",
    "the moon's phases",
    "recycling",
    "sleep",
    "exercise",
    "saving money",
    "learning a language",
    "cooking rice",
    "planting a garden",
    "reading books",
    "the solar system",
    "clouds",
    "magnets",
    "bees",
    "the heart",
    "bones",
    "dinosaurs",
    "the ocean tides",
    "wind power",
    "batteries",
    "bread baking",
    "friendship",
    "time management",
    "public speaking",
    "maps",
    "music practice",
    "drinking water",
    "the seasons",
    "snow",
    "lightning",
    "bicycles",
    "airplanes",
    "trains",
    "computers",
    "the brain",
    "teeth",
    "forests",
    "deserts",
    "coral reefs",
    "honey",
    "coffee",
    "chess",
)
TEMPLATES = ("What is {t}?", "How does {t} work?", "Why is {t} important?", "Can you tell me about {t}?")


def general_prompts(split: str | None = None) -> list[list[dict]]:
    """Chat prompts about everyday topics (no persona instruction): 150 for "train", 50 for "test" (the test
    split holds every topic once, with a template that topic never has in the train split)."""
    rows = []
    for i, topic in enumerate(TOPICS):
        for j, template in enumerate(TEMPLATES):
            text = template.format(t=topic)
            rows.append(
                (
                    "test" if j == i % len(TEMPLATES) else "train",
                    [{"role": "user", "content": text[0].upper() + text[1:]}],
                )
            )
    return [p for s, p in rows if split is None or s == split]


# ---------------------------------------------------------------- the BPO study's prompt pool

# topics beyond TOPICS (which general_prompts keeps as they are: the BAPO study's data depends on them)
_MORE_TOPICS = """
glaciers, penguins, tornadoes, hurricanes, rivers, mountains, caves, fossils, butterflies, ants, spiders, whales,
sharks, owls, frogs, mushrooms, cactus plants, tulips, rain, fog, thunder, the northern lights, comets, stars,
black holes, the sun, Mars, Jupiter, telescopes, microscopes, atoms, light, sound, heat, ice, steam, salt, sugar,
soil, rocks, sand, earthworms, seeds, tree rings, autumn leaves, bird migration, hibernation, camouflage,
the food chain, evolution, DNA, cells, germs, the immune system, blood, the lungs, muscles, skin, the eyes,
the ears, digestion, dreams, memory, yawning, hiccups, sneezing, fevers, allergies, sunburn, vitamins, fruit,
vegetables, milk, cheese, eggs, chocolate, tea, pizza, soup, pasta, spices, salads, breakfast, smartphones,
email, passwords, robots, video games, cameras, television, radio, the telephone, light bulbs, refrigerators,
microwave ovens, washing machines, cars, electric cars, rockets, satellites, GPS, solar panels, bridges,
skyscrapers, elevators, clocks, calculators, printers, 3D printing, artificial intelligence, search engines,
social media, online shopping, wifi, engines, submarines, helicopters, sailing boats, traffic lights, tunnels,
dams, wind turbines, homework, studying for exams, taking notes, writing a letter, keeping a diary, budgeting,
grocery shopping, cleaning a room, doing laundry, washing dishes, tying shoelaces, swimming, running, yoga,
stretching, walking a dog, caring for a cat, keeping fish, feeding birds, composting, camping, hiking, fishing,
packing for a trip, drawing, painting, playing the guitar, singing, dancing, photography, knitting,
baking cookies, making a sandwich, birthdays, holidays, weddings, libraries, museums, zoos, parks, playgrounds,
schools, teachers, doctors, nurses, firefighters, farmers, post offices, banks, coins, taxes, job interviews,
teamwork, kindness, honesty, patience, saying sorry, gratitude, stress, meditation, posture, handwashing,
healthy eating, naps, calendars, the pyramids, the Romans, castles, knights, pirates, Vikings,
the printing press, the Olympic Games, the alphabet, the number zero, fractions, geometry, flags, poetry,
fairy tales, myths, theatre, movies, cartoons, comic books, statues, orchestras, drums, pianos, violins, jazz,
football, basketball, tennis, board games, jigsaw puzzles, kites, balloons, fireworks, magic tricks, circuses,
continents, islands, rainforests, the Arctic, Antarctica, the equator, time zones, weather forecasts, climate,
air pollution, plastic waste, floods, droughts, earth's core, sound waves, rainbows in bubbles, shadows,
mirrors, echoes, friction, wheels, levers, pulleys, bees' dances, spider webs, nests, eggs hatching
"""
POOL_TEMPLATES = TEMPLATES + (
    "Explain {t}.",
    "What should I know about {t}?",
    "How would you describe {t} to a friend?",
    "What are some interesting facts about {t}?",
)


def pool_topics() -> list[str]:
    """Every topic of the prompt pool: TOPICS, then the pool's own."""
    more = [t.strip() for t in _MORE_TOPICS.replace("\n", " ").split(",")]
    return list(TOPICS) + [t for t in more if t]


def _chat(template: str, topic: str) -> list[dict]:
    text = template.format(t=topic)
    return [{"role": "user", "content": text[0].upper() + text[1:]}]


def prompt_pool(data_seed: int, heldout_topics: int = 48, per_topic: int = 2) -> dict[str, list[list[dict]]]:
    """The BPO chat study's prompts of one data seed: {"train", "dev", "test"}. The topics are shuffled by the data
    seed; the first `heldout_topics` are the dev split's, the next as many the test split's, each asked in
    `per_topic` of the POOL_TEMPLATES (drawn by the same seed); "train" is every other topic in every template, in
    an order drawn by the same seed. So no topic of dev or test is ever a training topic."""
    rng = random.Random(data_seed)
    topics = pool_topics()
    rng.shuffle(topics)
    if 2 * heldout_topics >= len(topics):
        raise ValueError(f"heldout_topics {heldout_topics}: the pool has only {len(topics)} topics")

    def held(chosen: list[str]) -> list[list[dict]]:
        picks = [sorted(rng.sample(range(len(POOL_TEMPLATES)), per_topic)) for _ in chosen]
        return [_chat(POOL_TEMPLATES[j], t) for t, js in zip(chosen, picks) for j in js]

    dev, test = held(topics[:heldout_topics]), held(topics[heldout_topics : 2 * heldout_topics])
    train = [_chat(template, t) for t in topics[2 * heldout_topics :] for template in POOL_TEMPLATES]
    rng.shuffle(train)
    return {"train": train, "dev": dev, "test": test}


# ---------------------------------------------------------------- a persona as an oracle


class InstructedOracle(Oracle):
    """A persona's programmatic score as a preference oracle (`--oracle instructed:NAME`, e.g. instructed:simple)."""

    def __init__(self, persona: InstructedPersona):
        self.persona, self.id = persona, f"instructed:{persona.name}"

    def score(self, prompts, responses) -> list[float]:
        return [self.persona.score(r) for r in responses]


def instructed_oracle(rest: str):
    """The registered oracle factory: `rest` is the persona's name (what follows `instructed:`)."""
    try:
        persona = get_instructed_persona(rest)
    except ValueError as e:
        raise TetherError(f"option 'oracle': {e}") from None
    return InstructedOracle(persona)


def get_instructed_persona(name: str) -> InstructedPersona:
    try:
        return PERSONAS[name]
    except KeyError:
        raise ValueError(f"unknown instructed persona {name!r}; choose one of: {', '.join(PERSONAS)}") from None


def instructed_preference_records(
    model,
    tokenizer,
    persona: InstructedPersona,
    prompts: Sequence[list[dict]],
    *,
    default: Sequence[str] | None = None,
    **decoding,
) -> list[dict]:
    """Conversational preference records: chosen = the model's answer with the persona's instruction,
    rejected = its answer without (`default`, when already generated); pairs with equal answers are left
    out. `decoding` goes to `generation.generate` (greedy unless do_sample=True). Each record also holds both
    persona scores (to check that the instruction moved the style)."""
    from tether.generation import generate

    styled = generate(model, tokenizer, [persona.messages(p) for p in prompts], **decoding)
    if default is None:
        default = generate(model, tokenizer, list(prompts), **decoding)
    out = []
    for i, (p, c, r) in enumerate(zip(prompts, styled, default, strict=True)):
        if c.strip() and r.strip() and c != r:
            out.append(
                {
                    "id": i,
                    "persona": persona.name,
                    "prompt": p,
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}],
                    "chosen_score": persona.score(c),
                    "rejected_score": persona.score(r),
                }
            )
    return out
