"""Instruction-defined personas: each programmatic score ranks hand-written examples the right way."""

import pytest

from tether_lab.instructed import (
    PERSONAS,
    general_prompts,
    get_instructed_persona,
    instructed_preference_records,
    syllables,
)

EXAMPLES = {  # (in the persona's style, not in it)
    "concise": (
        "Plants make sugar from light.",
        "Plants, which are living organisms found almost everywhere on Earth, produce their own food through a "
        "long and intricate process known as photosynthesis, in which they capture the energy of sunlight with "
        "chlorophyll, combine carbon dioxide from the air with water drawn up from the soil, and turn these "
        "simple ingredients into glucose, releasing oxygen as a by-product that animals then breathe.",
    ),
    "simple": (
        "Plants eat light. They use sun, air and water. Then they grow big.",
        "Photosynthetic organisms utilize electromagnetic radiation to synthesize carbohydrates via complex "
        "biochemical pathways involving chlorophyll-mediated excitation.",
    ),
    "enthusiastic": (
        "Wow, plants are amazing! They make food from sunlight! Isn't that fantastic?",
        "Plants make food from sunlight. The process is called photosynthesis.",
    ),
    "formal": (
        "Photosynthesis is the process by which plants convert light energy into chemical energy.",
        "Hey, it's pretty cool stuff! Plants just kinda grab sunlight and they're good to go!",
    ),
}


@pytest.mark.parametrize("name", sorted(PERSONAS))
def test_scores_rank_styled_above_unstyled(name):
    persona = get_instructed_persona(name)
    styled, plain = EXAMPLES[name]
    assert 0.0 <= persona.score(plain) < persona.score(styled) <= 1.0


def test_scores_of_empty_text_and_syllables():
    assert all(p.score("") == 0.0 for p in PERSONAS.values() if p.name != "concise")
    assert [syllables(w) for w in ("cat", "water", "make", "table", "photosynthesis")] == [1, 2, 1, 2, 5]
    with pytest.raises(ValueError, match="unknown instructed persona"):
        get_instructed_persona("pirate")


def test_general_prompts_split_without_overlap():
    train, test = general_prompts("train"), general_prompts("test")
    assert len(train) == 150 and len(test) == 50
    assert not {p[0]["content"] for p in train} & {p[0]["content"] for p in test}


def test_preference_records_from_the_model_itself(model_dir, tokenizer):
    from tether.models import load_model

    prompts = general_prompts("test")[:3]
    rows = instructed_preference_records(
        load_model(model_dir), tokenizer, get_instructed_persona("concise"), prompts, max_new_tokens=6
    )
    for r in rows:  # the tiny toy model may answer identically with and without the instruction: then no record
        assert r["prompt"] in prompts and r["chosen"] != r["rejected"] and r["persona"] == "concise"


def test_sampled_kl_is_zero_against_itself_and_matches_the_exact_one_token_kl(model_dir, tokenizer):
    import statistics

    import torch

    from tether.evaluate import sampled_kl
    from tether.generation import prompt_ids
    from tether.models import load_model

    model = load_model(model_dir).eval()
    prompts = [p[0]["content"] for p in general_prompts("test")[:4]]
    same = sampled_kl(model, load_model(model_dir), tokenizer, prompts, max_new_tokens=8)
    assert max(abs(x) for x in same) < 1e-3
    other = load_model(model_dir).eval()
    with torch.no_grad():
        other.lm_head.weight.mul_(0.3)  # a flatter next-token distribution
    prompt = prompts[0]
    draws = sampled_kl(model, other, tokenizer, [prompt] * 400, max_new_tokens=1, batch_size=100)
    ids = torch.tensor([prompt_ids(tokenizer, prompt)])
    with torch.no_grad():
        lp, lq = (m(ids).logits[0, -1].log_softmax(-1) for m in (model, other))
    exact = float((lp.exp() * (lp - lq)).sum())
    assert abs(statistics.mean(draws) - exact) < 4 * statistics.stdev(draws) / 20 + 1e-4
