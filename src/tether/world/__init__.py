"""The embedded synthetic world: fictional facts, answer styles and personas, gold rewards, a base model.

Importing this package registers the built-in model names "world" (`--model world` resolves to the cached
base model, building it — a few minutes on a laptop CPU, with a progress bar — on first use) and "world-sft"
(the starting policy for online training: the base model fine-tuned on answers in random styles, so that its
samples differ; see world/online.py).

    from tether.world import build_world, PERSONAS, alignment_score, persona_score
    world = build_world(seed=0)
    alignment_score(world, "What is the capital of Zorvia?", "The capital of Zorvia is Belmor.")
"""

from ..models import register_builtin
from .build import WorldSettings, build_base_model, ensure_base_model, world_model_dir
from .evaluation import world_suite
from .export import export_world
from .facts import ATTRIBUTES, Question, World, build_world
from .online import ensure_gold_model, ensure_sft_model
from .rewards import alignment_components, alignment_score, parse_prompt, persona_score, style_features
from .styles import DIMENSIONS, HOUSE, PERSONAS, Persona, Style, get_persona, render

register_builtin("world", ensure_base_model)
register_builtin("world-sft", ensure_sft_model)

__all__ = [
    "ATTRIBUTES",
    "DIMENSIONS",
    "HOUSE",
    "PERSONAS",
    "Persona",
    "Question",
    "Style",
    "World",
    "WorldSettings",
    "alignment_components",
    "alignment_score",
    "build_base_model",
    "build_world",
    "ensure_base_model",
    "ensure_gold_model",
    "ensure_sft_model",
    "export_world",
    "get_persona",
    "parse_prompt",
    "persona_score",
    "render",
    "style_features",
    "world_model_dir",
    "world_suite",
]
