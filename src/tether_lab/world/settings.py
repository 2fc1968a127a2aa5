"""What determines the world and its base model (`WorldSettings`), apart from the build itself (build.py).

Kept free of torch so that `tether world build --help` and option errors answer without loading it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from tether.config import TetherError, option
from tether_lab.world.facts import World, build_world
from tether_lab.world.paraphrased_house import PARAPHRASED_HOUSE_VERSION

WORLD_VERSION = 1  # bump when the world's text or the training recipe changes, to invalidate old caches
NOT_FINGERPRINTED = {"progress"}
RECIPES = (1, 2)


@dataclasses.dataclass
class WorldSettings:
    """Everything that determines the world and its base model."""

    seed: int = option(0, "seed of the world (names, facts, splits) and of the model's initialisation and batches")
    n_entities: int = option(150, "number of fictional realms; each has 4 facts")
    vocab_size: int = option(1024, "size of the BPE vocabulary trained on the world's text")
    hidden_size: int = option(192, "hidden size of the Llama-style base model")
    num_layers: int = option(4, "number of transformer layers")
    num_heads: int = option(4, "number of attention heads")
    batch_size: int = option(32, "sequences per optimizer step in both stages")
    pretrain_steps: int = option(700, "optimizer steps of language modelling on the fact statements")
    sft_steps: int = option(400, "optimizer steps of instruction tuning on house-style answers (loss on answer tokens)")
    lr: float = option(2e-3, "peak AdamW learning rate (linear warm-up, cosine decay to a tenth of it, in each stage)")
    recipe: int = option(
        1,
        "world recipe: 1, or 2 (house answers in four paraphrases so the base model is not "
        "deterministic, held-out realms; world/paraphrased_house.py)",
        choices=RECIPES,
    )
    progress: bool = option(True, "show a progress bar")

    def validate(self) -> None:
        """Raise TetherError naming the first option that cannot work."""
        checks = [
            ("n_entities", self.n_entities >= 4, "must be at least 4 (4-way multiple choice)"),
            ("vocab_size", self.vocab_size >= 300, "must be at least 300 (256 bytes + special tokens + merges)"),
            ("hidden_size", self.hidden_size % self.num_heads == 0, "must be divisible by --num_heads"),
            ("batch_size", self.batch_size >= 1, "must be at least 1"),
            ("pretrain_steps", self.pretrain_steps >= 0 and self.sft_steps >= 0, "and --sft_steps must be >= 0"),
            ("lr", self.lr > 0, "must be positive"),
            ("recipe", self.recipe in RECIPES, f"must be one of {', '.join(map(str, RECIPES))}"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise TetherError(f"option --{name}: {what}")

    def fingerprint(self) -> str:
        """Short hash of the settings that change the built model (plus WORLD_VERSION). Recipe 1 hashes exactly
        what it hashed before recipes existed (no "recipe" key), so its cached models keep their fingerprints."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_FINGERPRINTED}
        if self.recipe == 1:
            del fields["recipe"]
        else:
            fields["recipe_version"] = PARAPHRASED_HOUSE_VERSION
        blob = json.dumps({"version": WORLD_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def world(self) -> World:
        """The world these settings describe."""
        return build_world(self.seed, self.n_entities)
