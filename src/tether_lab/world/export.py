"""Write the world's datasets as jsonl in TRL's conversational formats.

OUT/
  world.json                         settings, dimensions, house style, personas (with heterogeneity), file list
  facts.jsonl                        {"id", "entity", "attribute", "value", "statement", "split"}
  knowledge_mc.jsonl                 {"id", "prompt", "options", "answer"}         (4-way multiple choice)
  sft_{train,test}.jsonl             {"id", "prompt", "completion"}                 (house-style answers)
  prompts_{train,test}.jsonl         {"id", "prompt", "reference"}                  (reference = house answer)
  personas/<name>/preferences_{train,test}.jsonl   {"id", "persona", "prompt", "chosen", "rejected"}
  personas/<name>/prompts_{train,test}.jsonl       {"id", "persona", "prompt", "reference"}
                                                   (reference in the persona's style)

A prompt is [{"role": "user", "content": question}]; a completion/chosen/rejected is
[{"role": "assistant", "content": answer}]. Chosen is the persona's style, rejected the house style or
(with rejected="mixed", for half the pairs) another style that differs from the persona, or (rejected=
"never-house") a style that is neither the persona's nor the house's; both state the fact correctly.
With recipe 2 (world/paraphrased_house.py) "train" holds every question about the personalization realms and "test"
one question per fact of the held-out realms; with recipe 1 they are the world's question splits.
Everything is seeded per record, so the files are byte-identical for the same settings.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tether.config import TetherError
from tether.files import share_like_umask
from tether_lab.world import paraphrased_house
from tether_lab.world.facts import World
from tether_lab.world.styles import DIMENSIONS, HOUSE, PERSONAS, Persona, render

SPLITS = ("train", "test")
REJECTED = ("house", "mixed", "never-house")


def _write_jsonl(path: Path, records: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def rejected_style(persona: Persona, rng: random.Random, mode: str):
    """The style of a rejected answer: the house style, or (mode "mixed", half the time) a random style
    other than the persona's (the house style too when the persona is the house); mode "never-house": a random
    style that is neither."""
    if mode == "never-house":
        return paraphrased_house.rejected_style_never_house(persona, rng)
    if persona.style != HOUSE and (mode == "house" or rng.random() < 0.5):
        return HOUSE
    return rng.choice([p.style for p in PERSONAS.values() if p.style != persona.style])


def split_questions(world: World, split: str, recipe: int = 1) -> list:
    """The questions of `split`: the world's split (recipe 1), or personalization realms / held-out realms
    (recipe 2)."""
    if recipe == 2:
        return (
            paraphrased_house.personal_questions(world) if split == "train" else paraphrased_house.eval_questions(world)
        )
    return world.questions(split)


def preference_records(
    world: World, persona: Persona, split: str, rejected: str = "mixed", recipe: int = 1
) -> list[dict]:
    """One preference pair per question of `split` for `persona`."""
    out = []
    for q in split_questions(world, split, recipe):
        rng = random.Random(f"{world.seed}/pref/{persona.name}/{q.id}")
        chosen = render(world, q.entity, q.attribute, persona.style, rng)
        other = render(world, q.entity, q.attribute, rejected_style(persona, rng, rejected), rng)
        out.append(
            {
                "id": q.id,
                "persona": persona.name,
                "prompt": _user(q.text),
                "chosen": _assistant(chosen),
                "rejected": _assistant(other),
            }
        )
    return out


def prompt_records(world: World, split: str, persona: Persona | None = None, recipe: int = 1) -> list[dict]:
    """{"id", "prompt", "reference"} per question; the reference is in the persona's (or house) style."""
    style = persona.style if persona else HOUSE
    out = []
    for q in split_questions(world, split, recipe):
        rng = random.Random(f"{world.seed}/ref/{persona.name if persona else 'house'}/{q.id}")
        record = {"id": q.id, "prompt": _user(q.text), "reference": render(world, q.entity, q.attribute, style, rng)}
        out.append(({"id": q.id, "persona": persona.name} | record) if persona else record)
    return out


def world_summary(world: World, personas: list[Persona]) -> dict:
    """The world.json written next to the data files."""
    return {
        "seed": world.seed,
        "n_entities": len(world.entities),
        "n_facts": sum(len(f) for f in world.facts.values()),
        "test_fraction": world.test_fraction,
        "dimensions": {d: list(p) for d, p in DIMENSIONS.items()},
        "house_style": HOUSE.poles(),
        "personas": {p.name: {"heterogeneity": p.heterogeneity, "poles": p.style.poles()} for p in personas},
    }


def export_world(
    world: World,
    out: str | Path,
    personas: list[str] | None = None,
    rejected: str = "mixed",
    overwrite: bool = False,
    recipe: int = 1,
) -> dict:
    """Write every dataset of `world` into directory `out` (see the module docstring); returns world.json's content.

    `personas` defaults to every persona except the house. Files are written into a temporary directory
    that replaces `out` only when complete.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TetherError(
            f"--out {out}: directory exists and is not empty; pass --overwrite true or choose another directory"
        )
    chosen = [PERSONAS[n] for n in personas] if personas else [p for p in PERSONAS.values() if p.heterogeneity > 0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        counts = {}
        facts = [
            {
                "id": f"{e}/{a}",
                "entity": e,
                "attribute": a,
                "value": v,
                "statement": world.statement(e, a),
                "split": world.split_of(e, a),
            }
            for e in world.entities
            for a, v in world.facts[e].items()
        ]
        counts["facts.jsonl"] = _write_jsonl(tmp / "facts.jsonl", facts)
        counts["knowledge_mc.jsonl"] = _write_jsonl(tmp / "knowledge_mc.jsonl", world.multiple_choice())
        for split in SPLITS:
            prompts = prompt_records(world, split, recipe=recipe)
            sft = [{"id": r["id"], "prompt": r["prompt"], "completion": _assistant(r["reference"])} for r in prompts]
            counts[f"sft_{split}.jsonl"] = _write_jsonl(tmp / f"sft_{split}.jsonl", sft)
            counts[f"prompts_{split}.jsonl"] = _write_jsonl(tmp / f"prompts_{split}.jsonl", prompts)
            for p in chosen:
                for kind, records in (
                    ("preferences", preference_records(world, p, split, rejected, recipe)),
                    ("prompts", prompt_records(world, split, p, recipe)),
                ):
                    name = f"personas/{p.name}/{kind}_{split}.jsonl"
                    counts[name] = _write_jsonl(tmp / name, records)
        summary = world_summary(world, chosen) | {"recipe": recipe, "rejected": rejected, "files": counts}
        (tmp / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
        share_like_umask(tmp)  # mkdtemp makes the directory private
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
