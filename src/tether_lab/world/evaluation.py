"""The world evaluation suite: knowledge, general alignment, and one persona's score and win rate.

- knowledge_accuracy: 4-way multiple choice over every fact, options scored by completion log-likelihood.
- general_alignment: mean gold alignment score of greedy answers to the held-out prompts.
- persona (optional): mean gold persona score of the same answers (gated on the answer being correct), their
  style match (the same without the gate), the base model's scores, and the win rate against the base model's
  greedy answers on the persona score (ties count one half).
Each metric is {"mean", "ci95_low", "ci95_high", "n"} (95% percentile bootstrap over items).
"""

from __future__ import annotations

from functools import partial

from tether.evaluate import multiple_choice_correct, score_responses
from tether.generation import generate
from tether.stats import summarize, win_rates
from tether_lab.world.facts import World
from tether_lab.world.rewards import alignment_score, persona_score, style_match
from tether_lab.world.styles import get_persona

N_SAMPLES = 3  # example answers kept in the output for a human to eyeball


def prompts_of(world: World, split: str) -> list[list[dict]]:
    """The chat prompts of one split's questions, in the world's fixed order."""
    return [[{"role": "user", "content": q.text}] for q in world.questions(split)]


def world_suite(
    model,
    tokenizer,
    world: World,
    *,
    persona: str | None = None,
    base=None,
    split: str = "test",
    batch_size: int = 32,
    max_new_tokens: int = 96,
    progress: bool = False,
) -> dict:
    """Evaluate `model` on `world`; JSON-serialisable results.

    `base` = (model, tokenizer) of the model to compare a persona against (needed only with `persona`).
    """
    knowledge = multiple_choice_correct(model, tokenizer, world.multiple_choice(), batch_size)
    prompts = prompts_of(world, split)
    answers = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    aligned = score_responses(partial(alignment_score, world), prompts, answers)
    result = {
        "suite": "world",
        "world": {"seed": world.seed, "n_entities": len(world.entities), "split": split},
        "knowledge_accuracy": summarize(knowledge),
        "general_alignment": summarize(aligned),
        "samples": [{"prompt": p[-1]["content"], "response": a} for p, a in zip(prompts[:N_SAMPLES], answers)],
    }
    if persona is not None:
        p = get_persona(persona)
        score = partial(persona_score, world, p)
        mine = score_responses(score, prompts, answers)
        style = partial(style_match, world, p)
        result["persona"] = {
            "name": p.name,
            "heterogeneity": p.heterogeneity,
            "poles": p.style.poles(),
            "score": summarize(mine),
            "style_match": summarize(score_responses(style, prompts, answers)),
        }
        if base is not None:
            base_answers = generate(
                *base, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
            )
            theirs = score_responses(score, prompts, base_answers)
            result["persona"]["base_score"] = summarize(theirs)
            result["persona"]["base_style_match"] = summarize(score_responses(style, prompts, base_answers))
            result["persona"]["win_rate_vs_base"] = summarize(win_rates(mine, theirs))
    return result
