"""Instruction-defined personas: each programmatic score ranks hand-written examples the right way."""

import pytest

from tether.instructed import PERSONAS, general_prompts, get_persona, preference_records, syllables

EXAMPLES = {  # (in the persona's style, not in it)
    "concise": ("Plants make sugar from light.",
                "Plants, which are living organisms found almost everywhere on Earth, produce their own food through a "
                "long and intricate process known as photosynthesis, in which they capture the energy of sunlight with "
                "chlorophyll, combine carbon dioxide from the air with water drawn up from the soil, and turn these "
                "simple ingredients into glucose, releasing oxygen as a by-product that animals then breathe."),
    "simple": ("Plants eat light. They use sun, air and water. Then they grow big.",
               "Photosynthetic organisms utilize electromagnetic radiation to synthesize carbohydrates via complex "
               "biochemical pathways involving chlorophyll-mediated excitation."),
    "enthusiastic": ("Wow, plants are amazing! They make food from sunlight! Isn't that fantastic?",
                     "Plants make food from sunlight. The process is called photosynthesis."),
    "formal": ("Photosynthesis is the process by which plants convert light energy into chemical energy.",
               "Hey, it's pretty cool stuff! Plants just kinda grab sunlight and they're good to go!"),
}


@pytest.mark.parametrize("name", sorted(PERSONAS))
def test_scores_rank_styled_above_unstyled(name):
    persona = get_persona(name)
    styled, plain = EXAMPLES[name]
    assert 0.0 <= persona.score(plain) < persona.score(styled) <= 1.0


def test_scores_of_empty_text_and_syllables():
    assert all(p.score("") == 0.0 for p in PERSONAS.values() if p.name != "concise")
    assert [syllables(w) for w in ("cat", "water", "make", "table", "photosynthesis")] == [1, 2, 1, 2, 5]
    with pytest.raises(ValueError, match="unknown instructed persona"):
        get_persona("pirate")


def test_general_prompts_split_without_overlap():
    train, test = general_prompts("train"), general_prompts("test")
    assert len(train) == 150 and len(test) == 50
    assert not {p[0]["content"] for p in train} & {p[0]["content"] for p in test}


def test_preference_records_from_the_model_itself(model_dir, tokenizer):
    from tether.models import load_model

    prompts = general_prompts("test")[:3]
    rows = preference_records(load_model(model_dir), tokenizer, get_persona("concise"), prompts, max_new_tokens=6)
    for r in rows:  # the tiny toy model may answer identically with and without the instruction: then no record
        assert r["prompt"] in prompts and r["chosen"] != r["rejected"] and r["persona"] == "concise"
