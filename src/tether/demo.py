"""A toy preference task and a tiny model for it: the demo's and the tests' smallest real workload.

Prompts ask about an object's colour; the chosen answer is a polite full sentence, the rejected one a
curt fragment. A tiny Llama (random init) learns to prefer the polite style within a few dozen steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OBJECTS = ["apple", "sky", "leaf", "sun", "rose", "sea", "snow", "coal", "lime", "plum", "sand", "ink", "gold", "rust"]
COLOURS = ["red", "blue", "green", "yellow", "pink", "teal", "white", "black", "olive", "purple", "tan", "navy"]


def toy_preferences(n: int, seed: int = 0, conversational: bool = False) -> list[dict]:
    """n preference records in TRL's standard (or conversational) format, with an "id" field."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        obj, col = rng.choice(OBJECTS), rng.choice(COLOURS)
        prompt = f"What colour is the {obj}?"
        chosen = f"The {obj} is {col}, I believe. Thank you for asking!"
        rejected = rng.choice([f"{col}.", f"dunno, {col}?", f"{obj}: {col}"])
        if conversational:
            rows.append({
                "id": i,
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            })
        else:
            rows.append({"id": i, "prompt": prompt + "\n", "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_model(path: str | Path, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0) -> Path:
    """Train a tokenizer on the toy task's text, build a tiny Llama for it, save both to `path`."""
    from .tiny import tiny_llama, train_tokenizer

    texts = []
    for r in toy_preferences(400, seed=seed + 1):
        texts += [r["prompt"], r["chosen"], r["rejected"]]
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    model = tiny_llama(tok, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
