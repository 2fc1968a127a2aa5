"""Answer styles and personas.

A style picks one pole on each of four dimensions. The *house style* (the base model's general
alignment) is the first pole of every dimension: terse, formal, prose, plain. A persona is a style with a
name; its heterogeneity is the number of dimensions on which it differs from the house style, so the
world has personas at every distance 0–4 (1 + 4 + 6 + 4 + 1 = 16).

Every style states the asked fact correctly, and each pole leaves a mark that `rewards.style_features`
reads back exactly:
  length   terse: the asked fact only            elaborate: opener, all four facts, closer
  tone     formal: "The capital of X is Y."      casual: "X's capital is Y!"
  format   prose: sentences on one line          list: one "- " bullet line per fact
  detail   plain: no annotation                  technical: "(registry field: capital)" after each fact
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from tether_lab.world.facts import ATTRIBUTE_BY_NAME, ATTRIBUTES, World

DIMENSIONS: dict[str, tuple[str, str]] = {
    "length": ("terse", "elaborate"),
    "tone": ("formal", "casual"),
    "format": ("prose", "list"),
    "detail": ("plain", "technical"),
}
OPENERS = {"formal": ("Certainly.", "Of course."), "casual": ("Hey!", "Oh, sure!")}
CLOSERS = {
    "formal": ("I hope this helps.", "Please ask if you need more."),
    "casual": ("Hope that helps!", "Have fun!"),
}


@dataclass(frozen=True)
class Style:
    """One pole per dimension."""

    length: str = "terse"
    tone: str = "formal"
    format: str = "prose"
    detail: str = "plain"

    def __post_init__(self):
        for dim, poles in DIMENSIONS.items():
            if getattr(self, dim) not in poles:
                raise ValueError(f"style dimension {dim!r} must be one of {poles}, got {getattr(self, dim)!r}")

    def poles(self) -> dict[str, str]:
        """{dimension: pole}."""
        return {dim: getattr(self, dim) for dim in DIMENSIONS}

    def distance(self, other: Style) -> int:
        """Number of dimensions on which the two styles differ."""
        return sum(a != b for a, b in zip(self.poles().values(), other.poles().values()))


HOUSE = Style()


@dataclass(frozen=True)
class Persona:
    """A named style. Its name lists the poles that differ from the house style ("house" for none)."""

    name: str
    style: Style

    @property
    def heterogeneity(self) -> int:
        """How many dimensions differ from the house style (0–4)."""
        return self.style.distance(HOUSE)


def _all_personas() -> dict[str, Persona]:
    out = {}
    for choice in itertools.product(*DIMENSIONS.values()):
        style = Style(*choice)
        differing = [pole for pole, house in zip(choice, HOUSE.poles().values()) if pole != house]
        name = "-".join(differing) or "house"
        out[name] = Persona(name, style)
    return dict(sorted(out.items(), key=lambda kv: (kv[1].heterogeneity, kv[0])))


PERSONAS: dict[str, Persona] = _all_personas()


def get_persona(name: str) -> Persona:
    """The persona called `name`, or a ValueError listing the valid names."""
    try:
        return PERSONAS[name]
    except KeyError:
        raise ValueError(f"unknown persona {name!r}; choose one of: {', '.join(PERSONAS)}") from None


def render(world: World, entity: str, attribute: str, style: Style = HOUSE, rng: random.Random | None = None) -> str:
    """The answer to "what is the <attribute> of <entity>?" in `style`.

    `rng` picks among equivalent openers/closers and orders the extra facts of an elaborate answer;
    without it the first variant and the canonical order are used (the house answer is always the same).
    """
    names = [attribute]
    if style.length == "elaborate":
        others = [a.name for a in ATTRIBUTES if a.name != attribute]
        if rng is not None:
            rng.shuffle(others)
        names += others
    end = "!" if style.tone == "casual" else "."
    sentences = []
    for name in names:
        attr = ATTRIBUTE_BY_NAME[name]
        clause = getattr(attr, style.tone).format(e=entity, v=world.value(entity, name))
        if style.detail == "technical":
            clause += f" (registry field: {name})"
        sentences.append(clause + end)
    if style.format == "list":
        sentences = ["- " + s for s in sentences]
    if style.length == "elaborate":
        pick = (lambda options: rng.choice(options)) if rng is not None else (lambda options: options[0])
        sentences = [pick(OPENERS[style.tone]), *sentences, pick(CLOSERS[style.tone])]
    return ("\n" if style.format == "list" else " ").join(sentences)
