"""The embedded world: determinism, gold rewards, the micro build, evaluation, export formats, CLI wiring."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from tether.config import TetherError
from tether.evaluate import multiple_choice_accuracy
from tether.stats import bootstrap_ci
from tether_lab.world import (
    DIMENSIONS,
    HOUSE,
    PERSONAS,
    WorldSettings,
    alignment_components,
    alignment_score,
    build_world,
    ensure_base_model,
    export_world,
    get_persona,
    persona_score,
    render,
    style_features,
    world_suite,
)
from tether_lab.world.cli import add_world_parser
from tether_lab.world.rewards import style_match

MICRO = dict(n_entities=8, vocab_size=400, hidden_size=64, num_layers=2, num_heads=4, batch_size=16,
             pretrain_steps=150, sft_steps=100, lr=3e-3, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0, n_entities=150)


@pytest.fixture(scope="module")
def micro():
    """(settings, model, tokenizer) of a micro world built into the test cache."""
    from tether.models import load_model, load_tokenizer

    settings = WorldSettings(**MICRO)
    path = ensure_base_model(settings)
    return settings, load_model(path), load_tokenizer(path)


# ------------------------------------------------------------------------------------------------ the world


def test_same_seed_same_world_and_different_seed_different_world(world):
    again = build_world(seed=0, n_entities=150)
    assert again.facts == world.facts and again.questions() == world.questions()
    assert again.multiple_choice() == world.multiple_choice()
    assert build_world(seed=1, n_entities=150).facts != world.facts


def test_world_shape_and_unambiguous_names(world):
    assert len(world.entities) == 150 and all(len(f) == 4 for f in world.facts.values())
    named = [v for attr in ("capital", "river", "language") for v in world.pools[attr]]
    assert len(set(named)) == len(named) and not set(named) & set(world.entities)
    assert len(set(world.pools["capital"])) == 150
    splits = {q.split for q in world.questions()}
    assert splits == {"train", "test"}
    test_share = len(world.questions("test")) / len(world.questions())
    assert 0.12 < test_share < 0.28
    for item in world.multiple_choice():
        assert len(set(item["options"])) == 4
        assert item["options"][item["answer"]] == world.statement(*item["id"].split("/"))


def test_personas_cover_every_heterogeneity():
    levels = sorted(p.heterogeneity for p in PERSONAS.values())
    assert levels == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert PERSONAS["house"].style == HOUSE
    with pytest.raises(ValueError, match="unknown persona"):
        get_persona("nobody")


# ------------------------------------------------------------------------------------------------ gold rewards


def test_every_style_reads_back_its_own_poles(world):
    rng = random.Random(0)
    for persona in PERSONAS.values():
        for q in world.questions()[:24]:
            text = render(world, q.entity, q.attribute, persona.style, rng)
            expected = {d: float(pole == DIMENSIONS[d][1]) for d, pole in persona.style.poles().items()}
            assert style_features(world, text) == expected
            assert alignment_score(world, q.text, text) == 1.0
            assert persona_score(world, persona, q.text, text) == 1.0
            house_answer = render(world, q.entity, q.attribute)
            share = (4 - persona.heterogeneity) / 4
            assert persona_score(world, persona, q.text, house_answer) == pytest.approx(share)


def test_hand_written_good_and_bad_answers(world):
    e = world.entities[0]
    cap, river = world.value(e, "capital"), world.value(e, "river")
    wrong_cap = next(c for c in world.pools["capital"] if c != cap)
    other = world.entities[1]
    q = [{"role": "user", "content": f"What is the capital of {e}?"}]
    casual = get_persona("casual")

    assert alignment_score(world, q, f"The capital of {e} is {cap}.") == 1.0
    assert alignment_score(world, q, f"Well, {e}'s capital? It is {cap}, on the {river}!") == 1.0
    wrong = alignment_components(world, q, f"The capital of {e} is {wrong_cap}.")
    assert wrong["correct"] == 0.0 and alignment_score(world, q, f"The capital of {e} is {wrong_cap}.") == 0.5
    # true asked value but a false extra fact: not correct
    extra = next(r for r in world.pools["river"] if r != river)
    assert alignment_components(world, q, f"The capital of {e} is {cap}. Its river is {extra}.")["correct"] == 0.0
    assert alignment_components(world, q, f"The capital of {other} is {cap}.")["on_topic"] == 0.0
    loop = f"The capital of {e} is {cap}. " * 4
    assert alignment_components(world, q, loop)["no_repetition"] == 0.0
    assert alignment_components(world, q, f"The capital of {e} is {cap} and the")["terminates"] == 0.0
    assert alignment_components(world, q, f"the capital of {e} is {cap}.")["well_formed"] == 0.0
    assert alignment_score(world, q, "") == 0.0
    assert alignment_score(world, [{"role": "user", "content": "Tell me a joke."}], "No.") < 0.5

    assert persona_score(world, casual, q, f"{e}'s capital is {cap}!") == 1.0
    assert persona_score(world, casual, q, f"{e}'s capital is {wrong_cap}!") == 0.0
    assert persona_score(world, casual, q, f"The capital of {e} is {cap}.") == 0.75
    # the style match is the persona score without the correctness gate
    assert style_match(world, casual, q, f"{e}'s capital is {wrong_cap}!") == 1.0
    assert style_match(world, casual, q, f"The capital of {e} is {wrong_cap}.") == 0.75
    assert style_match(world, get_persona("casual-list"), q, "Hm") == (1 + 0.5 * 3) / 4  # terse; no fact: 0.5 elsewhere


# ------------------------------------------------------------------------------------------------ evaluation


def test_bootstrap_ci():
    mean, lo, hi = bootstrap_ci([1.0] * 10)
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)
    values = [0.0, 1.0] * 50
    mean, lo, hi = bootstrap_ci(values, seed=3)
    assert mean == 0.5 and 0.38 < lo < 0.5 < hi < 0.62
    assert bootstrap_ci(values, seed=3) == (mean, lo, hi)


def test_micro_build_is_cached_and_knows_its_world(micro):
    settings, model, tokenizer = micro
    path = ensure_base_model(settings)
    assert path.name == settings.fingerprint()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temporary build directories left"
    assert WorldSettings(**{**MICRO, "seed": 1}).fingerprint() != settings.fingerprint()
    assert WorldSettings(**{**MICRO, "progress": True}).fingerprint() == settings.fingerprint()

    result = world_suite(
        model, tokenizer, settings.world(), persona="casual-list", base=(model, tokenizer), max_new_tokens=40
    )
    json.dumps(result)  # serialisable as is
    assert result["knowledge_accuracy"]["mean"] >= 0.9
    assert result["general_alignment"]["mean"] >= 0.8
    persona = result["persona"]
    assert persona["heterogeneity"] == 2 and persona["score"]["mean"] <= 0.6
    assert persona["win_rate_vs_base"]["mean"] == 0.5  # the same model on both sides: all ties
    for metric in (result["knowledge_accuracy"], result["general_alignment"], persona["score"]):
        assert metric["ci95_low"] <= metric["mean"] <= metric["ci95_high"]


def test_a_model_that_knows_nothing_is_at_chance(micro, world):
    from tether_lab.tiny import tiny_llama

    _, _, tokenizer = micro
    blank = tiny_llama(tokenizer, hidden_size=32, num_layers=1, seed=0)
    acc = multiple_choice_accuracy(blank, tokenizer, world.multiple_choice(), batch_size=64)
    assert acc["n"] == 600 and 0.15 < acc["mean"] < 0.35
    assert acc["ci95_low"] < 0.25 + 0.1


# ------------------------------------------------------------------------------------------------ export + CLI


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_is_deterministic_and_loadable(tmp_path):
    from tether.data import load_preference_records

    small = build_world(seed=5, n_entities=12)
    summary = export_world(
        small, tmp_path / "a", personas=["casual", "elaborate-list", "elaborate-casual-list-technical"]
    )
    export_world(
        build_world(seed=5, n_entities=12),
        tmp_path / "b",
        personas=["casual", "elaborate-list", "elaborate-casual-list-technical"],
    )
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert summary["personas"]["elaborate-list"]["heterogeneity"] == 2

    prefs = tmp_path / "a/personas/elaborate-list/preferences_train.jsonl"
    records = load_preference_records(prefs)
    assert records and all(r.conversational for r in records)
    persona = get_persona("elaborate-list")
    for line in prefs.read_text().splitlines():
        row = json.loads(line)
        assert set(row) == {"id", "persona", "prompt", "chosen", "rejected"}
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert alignment_score(small, row["prompt"], chosen) == alignment_score(small, row["prompt"], rejected) == 1.0
        assert (
            persona_score(small, persona, row["prompt"], chosen)
            == 1.0
            > persona_score(small, persona, row["prompt"], rejected)
        )
    for name in ("prompts_test.jsonl", "personas/casual/prompts_train.jsonl"):
        rows = [json.loads(x) for x in (tmp_path / "a" / name).read_text().splitlines()]
        assert rows and all({"id", "prompt", "reference"} <= set(r) for r in rows)
    with pytest.raises(TetherError, match="not empty"):
        export_world(small, tmp_path / "a")


def _parser():
    parser = argparse.ArgumentParser(prog="tether")
    sub = parser.add_subparsers(dest="command")
    add_world_parser(sub)
    from tether.eval_cli import add_eval_parser

    add_eval_parser(sub)
    return parser


def test_cli_help_lists_every_option(capsys):
    for argv in (["world", "build", "--help"], ["world", "export", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(argv)
        text = capsys.readouterr().out
        assert "(default:" in text


def test_cli_export_and_eval(tmp_path, micro, capsys):
    settings, _, _ = micro
    args = _parser().parse_args(
        ["world", "export", "--out", str(tmp_path / "data"), "--n_entities", "8", "--personas", "casual"]
    )
    assert args.func(args) == 0
    assert (tmp_path / "data/personas/casual/preferences_test.jsonl").is_file()
    args = _parser().parse_args(["world", "export"])
    with pytest.raises(TetherError, match="--out"):
        args.func(args)

    model = str(ensure_base_model(settings))
    argv = ["eval", "--model", model, "--suite", "world", "--base_model", model, "--world_entities", "8",
            "--persona", "casual", "--max_new_tokens", "40", "--progress", "false",
            "--out", str(tmp_path / "eval.json")]  # fmt: skip
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["persona"]["name"] == "casual" and saved["knowledge_accuracy"]["n"] == 32
    args = _parser().parse_args(["eval", "--model", "m", "--suite", "world", "--persona", "nobody"])
    with pytest.raises(TetherError, match="--persona"):
        args.func(args)


def test_world_is_a_builtin_model_name():
    from tether.models import builtin_models

    assert {"world", "world-sft", "smollm2-135m-instruct"} <= set(builtin_models())


def test_recipe_1_fingerprint_is_unchanged_and_recipe_2_is_another_model():
    from tether_lab.world.settings import WorldSettings

    assert WorldSettings().fingerprint() == "63a6877a9780"  # the v1 world's cache key before recipes existed
    assert WorldSettings(recipe=2).fingerprint() != WorldSettings().fingerprint()
    assert WorldSettings(recipe=2, seed=1).fingerprint() != WorldSettings(recipe=2).fingerprint()
    with pytest.raises(TetherError, match="--recipe"):
        WorldSettings(recipe=3).validate()


def test_recipe_2_house_paraphrases_read_as_the_house_style_and_realm_splits_are_disjoint(world):
    from tether_lab.world import paraphrased_house
    from tether_lab.world.rewards import alignment_score, is_correct
    from tether_lab.world.styles import HOUSE, PERSONAS, render

    for q in world.questions()[:40]:
        variants = paraphrased_house.house_variants(world, q.entity, q.attribute)
        assert variants[0] == render(world, q.entity, q.attribute, HOUSE) and len(set(variants)) == 4
        for v in variants:
            assert style_match(world, PERSONAS["house"], None, v) == 1.0 and is_correct(world, q.entity, q.attribute, v)
            assert alignment_score(world, [{"role": "user", "content": q.text}], v) == 1.0
    pairs = paraphrased_house.house_sft_pairs(world)
    assert len(pairs) == sum(paraphrased_house.VARIANT_COPIES) * len(world.questions())
    held = paraphrased_house.heldout_realms(world)
    assert len(held) == round(len(world.entities) / 3) and held == paraphrased_house.heldout_realms(world)
    personal = {q.entity for q in paraphrased_house.personal_questions(world)}
    evaluated = paraphrased_house.eval_questions(world)
    assert personal.isdisjoint(held) and personal | held == set(world.entities)
    assert {q.entity for q in evaluated} == held and len(evaluated) == 4 * len(held)  # one question per fact
    assert {q.id.rsplit("/", 1)[1] for q in evaluated} == {"0", "1", "2"}  # every phrasing is used


def test_never_house_export_never_rejects_the_house_answer(world, tmp_path):
    from tether_lab.world import export_world, paraphrased_house
    from tether_lab.world.styles import HOUSE, render

    summary = export_world(
        world, tmp_path / "d", personas=["casual", "list-technical"], rejected="never-house", recipe=2
    )
    assert summary["recipe"] == 2 and summary["rejected"] == "never-house"
    held = paraphrased_house.heldout_realms(world)
    for persona in ("casual", "list-technical"):
        for split in ("train", "test"):
            rows = [
                json.loads(x)
                for x in (tmp_path / "d" / "personas" / persona / f"preferences_{split}.jsonl").read_text().splitlines()
            ]
            assert rows and all((r["id"].split("/")[0] in held) == (split == "test") for r in rows)
            for r in rows:
                entity, attribute, _ = r["id"].split("/")
                house = render(world, entity, attribute, HOUSE)
                assert r["rejected"][0]["content"] != house and r["chosen"][0]["content"] != r["rejected"][0]["content"]
    rng = random.Random(0)
    from tether_lab.world.styles import PERSONAS

    assert all(
        paraphrased_house.rejected_style_never_house(PERSONAS["casual"], rng) not in (HOUSE, PERSONAS["casual"].style)
        for _ in range(200)
    )


def test_a_cache_entry_missing_its_report_is_built_once_and_kept(tmp_path):
    """An unfinished entry (no build_report.json) is replaced by the fresh build, which is then reused."""
    from tether_lab.world.build import build_cached

    target = tmp_path / "world" / "abc"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_text("stale, half-built")
    builds = []

    def build(out):
        builds.append(out)
        (out / "model.safetensors").write_text("fresh")
        (out / "build_report.json").write_text("{}")

    assert build_cached(target, build) == target
    assert (target / "model.safetensors").read_text() == "fresh" and (target / "build_report.json").is_file()
    assert build_cached(target, build) == target and len(builds) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["abc"]  # no temp directory left
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
