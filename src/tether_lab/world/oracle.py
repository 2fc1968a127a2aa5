"""The embedded world's gold rewards as a tether oracle: `oracle: world` (general alignment) or
`oracle: world:persona=NAME` (one persona's score). Registered with tether in pyproject.toml (tether.oracles)."""

from __future__ import annotations

from tether.config import TetherError
from tether.oracles import Oracle


class WorldOracle(Oracle):
    """The embedded world's gold reward: general alignment, or one persona's score."""

    def __init__(self, persona: str | None = None, world=None):
        from tether_lab.world.build import WorldSettings
        from tether_lab.world.rewards import alignment_score, persona_score
        from tether_lab.world.styles import get_persona

        self.world = world or WorldSettings().world()
        if persona is None:
            self.id, self._fn = "world", lambda p, r: alignment_score(self.world, p, r)
        else:
            target = get_persona(persona)
            self.id, self._fn = f"world:persona={persona}", lambda p, r: persona_score(self.world, target, p, r)

    def score(self, prompts, responses):
        return [self._fn(p, r) for p, r in zip(prompts, responses, strict=True)]


def world_oracle(rest: str) -> WorldOracle:
    """The oracle of the spec `world` (rest "") or `world:persona=NAME` (rest "persona=NAME")."""
    if not rest:
        return WorldOracle()
    key, _, name = rest.partition("=")
    if key != "persona" or not name:
        raise TetherError(f"option 'oracle': 'world:{rest}' — write world or world:persona=NAME")
    try:
        return WorldOracle(persona=name)
    except ValueError as e:
        raise TetherError(f"option 'oracle': {e}") from None
