"""Starting and reference models for online preference optimization on the embedded world (the BPO study).

Why this exists: the world's base model is instruction-tuned on house-style answers only, so it is extremely
peaked — at temperature 1, top-k 50 both samples of a prompt are almost always the same house answer, the
online loop drops every identical pair, and nothing is learned. Online DAP needs a π_sft whose samples differ.

    π_sft   the base model fine-tuned (all weights) on correct answers to the train-split questions rendered in
            random styles, a fresh style per example; sampling it at temperature 1 gives answers of many styles,
            so pairs differ and the persona oracle separates them. Two recipes:
              uniform (v1, `rare_persona` empty): every style of the 16 equally likely;
              skewed (v2, `rare_persona` = NAME): each dimension on which NAME differs from the house style takes
                NAME's pole with probability `rare_prob` (the other pole otherwise), every other dimension is a
                fair coin. With rare_prob 0.1 and a heterogeneity-2 persona, 1% of π_sft's data has both of the
                persona's poles and 81% neither: the oracle's preferred answers are rare under π_sft, so offline
                pairs mostly compare two poor answers (BPO study v2).
    π_gold  π_sft fine-tuned further on the target persona's answers (train split): a stronger fixed model
            for the "π_ref = π_gold" ablation of the BPO paper.

Both are built once per setting and cached like the base model: `cache_dir()/world-online/<fingerprint>`,
where the fingerprint hashes the base model's fingerprint and every setting of this stage; a build is written
into a temporary directory and renamed into place. The training recipe is build.py's (`_train_stage`: AdamW,
linear warm-up, cosine decay to a tenth, loss on answer tokens only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tether.config import TetherError
from tether.files import cache_dir
from tether.models import load_model, load_tokenizer
from tether_lab.world.build import WorldSettings, _train_stage, build_cached, chat_examples, ensure_base_model
from tether_lab.world.facts import World
from tether_lab.world.styles import DIMENSIONS, PERSONAS, Style, get_persona, render

ONLINE_VERSION = 1  # bump when the recipe below changes


@dataclasses.dataclass
class OnlineModelSettings:
    """Everything that determines π_sft (and, with `persona`, π_gold)."""

    world: dict = dataclasses.field(default_factory=dict)  # WorldSettings overrides (the default world when empty)
    seed: int = 0  # styles drawn per example and batch order
    sft_steps: int = 300  # π_sft: steps on random-style answers
    gold_steps: int = 150  # π_gold: further steps on the target persona's answers
    batch_size: int = 32
    lr: float = 5e-4  # peak AdamW learning rate (warm-up 30 steps, cosine to a tenth)
    styles_per_question: int = 8  # random-style renderings of each train question in π_sft's data
    rare_persona: str = (
        ""  # skewed recipe (v2): this persona's non-house poles are rare in π_sft's data; "" = uniform (v1)
    )
    rare_prob: float = 0.1  # skewed recipe: probability of each of rare_persona's non-house poles

    def world_settings(self) -> WorldSettings:
        return WorldSettings(**{**self.world, "progress": False})

    def validate(self) -> None:
        """Raise TetherError naming the first setting that cannot work."""
        if self.rare_persona and self.rare_persona not in PERSONAS:
            raise TetherError(
                f"setting 'rare_persona': unknown persona {self.rare_persona!r}; choose one of: {', '.join(PERSONAS)}"
            )
        if self.rare_persona and get_persona(self.rare_persona).heterogeneity == 0:
            raise TetherError("setting 'rare_persona': the house persona has no non-house pole to make rare")
        if not 0.0 <= self.rare_prob <= 1.0:
            raise TetherError(f"setting 'rare_prob' must be in [0, 1], got {self.rare_prob}")

    def fingerprint(self, stage: str) -> str:
        fields = dataclasses.asdict(self)
        if not self.rare_persona:  # the uniform recipe (v1) keeps the fingerprint it had before the skewed one existed
            del fields["rare_persona"], fields["rare_prob"]
        blob = json.dumps(
            {"version": ONLINE_VERSION, "stage": stage, "base": self.world_settings().fingerprint(), **fields},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def random_style_answers(
    world: World, per_question: int, seed: int, rare_persona: str = "", rare_prob: float = 0.1
) -> list[tuple[str, str]]:
    """(question, answer) with `per_question` random styles per train question: uniformly random (of the 16)
    without `rare_persona`, else the skewed draw of `skewed_style` (module docstring)."""
    rng = random.Random(f"{world.seed}/online-sft/{seed}")
    if not rare_persona:  # v1: its random stream stays as it was
        styles = [p.style for p in PERSONAS.values()]
        draw = lambda: rng.choice(styles)  # noqa: E731
    else:
        rare = get_persona(rare_persona).style
        draw = lambda: skewed_style(rare, rare_prob, rng)  # noqa: E731
    return [
        (q.text, render(world, q.entity, q.attribute, draw(), rng))
        for q in world.questions("train")
        for _ in range(per_question)
    ]


def skewed_style(rare: Style, rare_prob: float, rng: random.Random) -> Style:
    """A style whose dimensions are drawn independently: where `rare` differs from the house style, rare's pole
    with probability `rare_prob`; elsewhere either pole with probability 1/2."""
    poles = {}
    for dim, (house, other) in DIMENSIONS.items():
        target = getattr(rare, dim)
        p = rare_prob if target != house else 0.5
        poles[dim] = other if rng.random() < p else house
    return Style(**poles)


def persona_answers(world: World, style: Style, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(f"{world.seed}/online-gold/{seed}")
    return [(q.text, render(world, q.entity, q.attribute, style, rng)) for q in world.questions("train")]


def _finetune(
    start: Path, answers, steps: int, settings: OnlineModelSettings, out: Path, stage: str, progress: bool
) -> dict:
    t0 = time.time()
    model, tokenizer = load_model(start), load_tokenizer(start)
    rows = chat_examples(tokenizer, answers)
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    with tqdm(total=steps, desc=f"world {stage}", disable=not progress) as bar:
        loss = _train_stage(model, rows, steps, settings, rng, bar, stage)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "stage": stage,
        "start": str(start),
        "settings": dataclasses.asdict(settings),
        "examples": len(rows),
        "final_loss": loss,
        "seconds": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def ensure_sft_model(settings: OnlineModelSettings | None = None, progress: bool = True) -> Path:
    """π_sft: the world base model fine-tuned on random-style answers (built once, then cached)."""
    settings = settings or OnlineModelSettings()
    settings.validate()
    base = ensure_base_model(dataclasses.replace(settings.world_settings(), progress=progress))
    world = settings.world_settings().world()
    answers = random_style_answers(
        world, settings.styles_per_question, settings.seed, settings.rare_persona, settings.rare_prob
    )
    target = cache_dir() / "world-online" / f"sft-{settings.fingerprint('sft')}"
    return build_cached(
        target, lambda tmp: _finetune(base, answers, settings.sft_steps, settings, tmp, "sft", progress)
    )


def ensure_gold_model(persona: str, settings: OnlineModelSettings | None = None, progress: bool = True) -> Path:
    """π_gold: π_sft fine-tuned further on `persona`'s answers (built once, then cached)."""
    settings = settings or OnlineModelSettings()
    sft = ensure_sft_model(settings, progress)
    world = settings.world_settings().world()
    answers = persona_answers(world, get_persona(persona).style, settings.seed)
    target = cache_dir() / "world-online" / f"gold-{persona}-{settings.fingerprint('gold')}"
    return build_cached(
        target, lambda tmp: _finetune(sft, answers, settings.gold_steps, settings, tmp, f"gold {persona}", progress)
    )
