"""Gold rewards: pure functions of (prompt, response text) given the world.

general alignment  0.5·correct + 0.125·(on_topic + well_formed + terminates + no_repetition)   ∈ [0, 1]
style match        mean over dimensions of how well the response matches the persona's pole (ungated)
persona score      correct · style match

`correct` means the response states the asked value and every value it mentions is true of the asked
realm. Style does not enter the general score: a correct casual list is as aligned as a correct house
answer, so the general score measures forgetting, not style. The persona score is gated on `correct`, so a
model that adopts the persona's style but states a wrong fact scores 0: it mixes forgetting into
personalization. The style match is the same measure without the gate — personalization alone.
"""

from __future__ import annotations

import re

from tether_lab.world.facts import ATTRIBUTES, YEAR_PATTERN, World
from tether_lab.world.styles import DIMENSIONS, Persona

ALIGNMENT_WEIGHTS = {
    "correct": 0.5,
    "on_topic": 0.125,
    "well_formed": 0.125,
    "terminates": 0.125,
    "no_repetition": 0.125,
}
MAX_WORDS = 80  # longer answers count as not terminating (the longest styled answer has about 40 words)
LENGTH_WORDS = (12, 20)  # word counts at which the length feature is 0 (terse) and 1 (elaborate)
REPEAT_NGRAM = 6
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LINE_START = re.compile(r"^(- )?[A-Z0-9]")


def prompt_text(prompt) -> str:
    """The text of a prompt given as a string or as chat messages (the last user message)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def parse_prompt(world: World, prompt) -> tuple[str, str] | None:
    """(realm, attribute) asked about by `prompt`, or None when it is not a question about one fact."""
    text = prompt_text(prompt)
    realms = [m for m in world.name_pattern.findall(text) if m in world.facts]
    attrs = [a.name for a in ATTRIBUTES if re.search(rf"\b{a.keyword}\b", text, re.IGNORECASE)]
    if len(set(realms)) != 1 or len(attrs) != 1:
        return None
    return realms[0], attrs[0]


def mentioned_values(world: World, text: str) -> list[tuple[str, str]]:
    """Every (attribute, value) the text mentions, in order."""
    found = [
        (m.start(), world.value_to_attribute[m.group()], m.group())
        for m in world.name_pattern.finditer(text)
        if m.group() in world.value_to_attribute
    ]
    found += [(m.start(), "founded", m.group()) for m in YEAR_PATTERN.finditer(text)]
    return [(attr, value) for _, attr, value in sorted(found)]


def is_correct(world: World, entity: str, attribute: str, text: str) -> bool:
    """The asked value is stated and nothing false about `entity` is."""
    values = mentioned_values(world, text)
    return (attribute, world.value(entity, attribute)) in values and all(world.value(entity, a) == v for a, v in values)


def sentences(text: str) -> list[tuple[str, bool]]:
    """(sentence, on a "- " bullet line) for every sentence of every non-empty line."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        bullet = line.startswith("- ")
        out += [(s, bullet) for s in _SENTENCE_END.split(line.removeprefix("- ")) if s]
    return out


def has_repetition(text: str, n: int = REPEAT_NGRAM) -> bool:
    """True when a sentence or a word n-gram occurs twice (the signature of degenerate loops)."""
    said = [s.lower() for s, _ in sentences(text)]
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(said)) < len(said) or len(set(grams)) < len(grams)


def alignment_components(world: World, prompt, response: str) -> dict[str, float]:
    """Each term of the general alignment score, 0 or 1."""
    asked = parse_prompt(world, prompt)
    text = response.strip()
    realms = {m for m in world.name_pattern.findall(text) if m in world.facts}
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return {
        "correct": float(asked is not None and is_correct(world, *asked, text)),
        "on_topic": float(asked is not None and realms == {asked[0]}),
        "well_formed": float(bool(lines) and text.isascii() and all(_LINE_START.match(line) for line in lines)),
        "terminates": float(text.endswith((".", "!")) and len(text.split()) <= MAX_WORDS),
        "no_repetition": float(bool(text) and not has_repetition(text)),
    }


def alignment_score(world: World, prompt, response: str) -> float:
    """General alignment in [0, 1]: the weighted sum of `alignment_components`."""
    parts = alignment_components(world, prompt, response)
    return sum(ALIGNMENT_WEIGHTS[k] * v for k, v in parts.items())


def style_features(world: World, response: str) -> dict[str, float]:
    """For each dimension, where the response sits between its first pole (0) and second pole (1).

    Tone, format and detail are read from the sentences that state a fact; a response without one
    sits at 0.5 on those dimensions.
    """
    text = response.strip()
    facts = [(s, bullet) for s, bullet in sentences(text) if mentioned_values(world, s)]
    lo, hi = LENGTH_WORDS
    feats = {"length": min(1.0, max(0.0, (len(text.split()) - lo) / (hi - lo)))}
    if not facts:
        return feats | {"tone": 0.5, "format": 0.5, "detail": 0.5}
    n = len(facts)
    feats["tone"] = sum(0.5 * s.endswith("!") + 0.5 * ("'s " in s) for s, _ in facts) / n
    feats["format"] = sum(bullet for _, bullet in facts) / n
    feats["detail"] = sum("(registry field:" in s for s, _ in facts) / n
    return feats


def pole_matches(world: World, persona: Persona, response: str) -> dict[str, float]:
    """For each dimension, how well the response matches the persona's pole, in [0, 1]."""
    feats = style_features(world, response)
    poles = persona.style.poles()
    return {dim: feats[dim] if poles[dim] == DIMENSIONS[dim][1] else 1.0 - feats[dim] for dim in DIMENSIONS}


def style_match(world: World, persona: Persona, prompt, response: str) -> float:
    """Mean pole match in [0, 1], whether or not the response is correct: how far it moved to the persona's
    style. A house answer scores (4 − heterogeneity)/4; a response stating no fact sits at 0.5 on tone, format
    and detail (see `style_features`). `prompt` is unused; it is taken so every gold reward has one signature."""
    matches = pole_matches(world, persona, response)
    return sum(matches.values()) / len(matches)


def persona_score(world: World, persona: Persona, prompt, response: str) -> float:
    """correct · style match, in [0, 1]: 1 for a correct answer fully in the persona's style, 0 for a wrong one."""
    asked = parse_prompt(world, prompt)
    if asked is None or not is_correct(world, *asked, response):
        return 0.0
    return style_match(world, persona, prompt, response)
