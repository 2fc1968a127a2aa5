"""The lab's suites for `tether eval --suite NAME` (registered in pyproject.toml, tether.eval_suites).

    tether eval --model M --suite world [--persona NAME]   knowledge, general alignment, persona score and win rate
    tether eval --model M --suite knowledge                the general-knowledge probe (399 questions)

Torch-free at import: `tether eval --help` lists these options; `run` loads the model."""

from __future__ import annotations

import dataclasses

from tether.config import TetherError, option
from tether_lab.world.styles import PERSONAS


def _load(common):
    from tether.models import load_model, load_tokenizer

    model, tokenizer = load_model(common.model, common.torch_dtype), load_tokenizer(common.model)
    if tokenizer.chat_template is None:
        raise TetherError(
            f"--model {common.model}: its tokenizer has no chat template; the suites ask questions as chat messages"
        )
    return model, tokenizer


@dataclasses.dataclass
class WorldSuite:
    """The embedded world's suite: knowledge accuracy, general alignment, persona score and win rate."""

    persona: str | None = option(
        None, "persona to score (adds persona score and win rate vs --base_model); see `tether world export` for names"
    )
    base_model: str = option("world", "model the persona win rate is measured against")
    world_seed: int = option(0, "seed of the world the model was built/trained on")
    world_entities: int = option(150, "number of realms of that world")
    split: str = option("test", "which prompts to answer for alignment and persona scores", choices=("test", "train"))
    max_new_tokens: int = option(96, "generation budget per answer (the longest styled answer of the world needs 82)")

    def validate(self) -> None:
        if self.persona is not None and self.persona not in PERSONAS:
            raise TetherError(f"option --persona: unknown persona {self.persona!r}; choose from {', '.join(PERSONAS)}")
        if self.world_entities < 4:
            raise TetherError("option --world_entities: must be at least 4")
        if self.max_new_tokens < 1:
            raise TetherError("option --max_new_tokens: must be at least 1")

    def run(self, common) -> dict:
        from tether.models import load_model, load_tokenizer
        from tether_lab.world import build_world, world_suite

        model, tokenizer = _load(common)
        base = None
        if self.persona is not None:
            same = self.base_model == common.model
            base = (
                (model, tokenizer)
                if same
                else (load_model(self.base_model, common.torch_dtype), load_tokenizer(self.base_model))
            )
        result = world_suite(
            model,
            tokenizer,
            build_world(self.world_seed, self.world_entities),
            persona=self.persona,
            base=base,
            split=self.split,
            batch_size=common.batch_size,
            max_new_tokens=self.max_new_tokens,
            progress=common.progress,
        )
        result["model"] = str(common.model)
        if self.persona is not None:
            result["persona"]["base_model"] = str(self.base_model)
        return result


@dataclasses.dataclass
class KnowledgeSuite:
    """The general-knowledge probe: multiple-choice accuracy on 399 questions, with a 95% CI."""

    def validate(self) -> None:
        pass

    def run(self, common) -> dict:
        from tether_lab.probes import knowledge_accuracy

        model, tokenizer = _load(common)
        return {
            "suite": "knowledge",
            "model": str(common.model),
            **knowledge_accuracy(model, tokenizer, common.batch_size),
        }
