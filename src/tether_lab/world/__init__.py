"""The embedded synthetic world: fictional facts, answer styles and personas, gold rewards, a base model.

The built-in model names "world" (`--model world` resolves to the cached
base model, building it — a few minutes on a laptop CPU, with a progress bar — on first use) and "world-sft"
(the starting policy for online training: the base model fine-tuned on answers in random styles, so that its
samples differ; see world/policies.py) are registered in tether.models.

    from tether_lab.world import build_world, PERSONAS, alignment_score, persona_score
    world = build_world(seed=0)
    alignment_score(world, "What is the capital of Zorvia?", "The capital of Zorvia is Belmor.")
"""

import importlib

# name -> submodule; imported on first use (PEP 562 `__getattr__`), so `tether world build --help` needs no torch
_WHERE = {
    **dict.fromkeys(["ATTRIBUTES", "Question", "World", "build_world"], ".facts"),
    **dict.fromkeys(["WorldSettings"], ".settings"),
    **dict.fromkeys(["build_base_model", "ensure_base_model", "world_model_dir"], ".build"),
    **dict.fromkeys(["world_suite"], ".evaluation"),
    **dict.fromkeys(["export_world"], ".export"),
    **dict.fromkeys(["ensure_gold_model", "ensure_sft_model"], ".policies"),
    **dict.fromkeys(
        ["alignment_components", "alignment_score", "parse_prompt", "persona_score", "style_features"], ".rewards"
    ),
    **dict.fromkeys(["DIMENSIONS", "HOUSE", "PERSONAS", "Persona", "Style", "get_persona", "render"], ".styles"),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
