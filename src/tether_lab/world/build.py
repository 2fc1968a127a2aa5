"""Build the world's base model: tokenizer, pre-training on the facts, instruction tuning in the house style.

The result is an ordinary Hugging Face model directory (save_pretrained) cached under
`tether.files.cache_dir()/world/<fingerprint>`; the fingerprint hashes every setting that changes the
model, so a build runs once per setting and is reused afterwards. A build writes into a temporary
directory and renames it into place, so the cache never holds a half-written model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tether.files import cache_dir, new_private_dir, share_like_umask
from tether_lab.tiny import tiny_llama, train_tokenizer
from tether_lab.world import paraphrased_house
from tether_lab.world.facts import ATTRIBUTES, World
from tether_lab.world.settings import NOT_FINGERPRINTED, WORLD_VERSION, WorldSettings
from tether_lab.world.styles import HOUSE, PERSONAS, render


def pretraining_documents(world: World, rng: random.Random) -> list[str]:
    """One document per realm: its four canonical statements in a random order."""
    docs = []
    for e in world.entities:
        names = [a.name for a in ATTRIBUTES]
        rng.shuffle(names)
        docs.append(" ".join(world.statement(e, n) for n in names))
    return docs


def tokenizer_corpus(world: World, recipe: int = 1) -> list[str]:
    """Text the tokenizer is trained on: statements, questions, and every persona's style on a few realms
    (recipe 2: and the house paraphrases on the same realms)."""
    rng = random.Random(world.seed)
    texts = pretraining_documents(world, rng) + [q.text for q in world.questions()]
    for e in world.entities[:10]:
        for persona in PERSONAS.values():
            texts += [render(world, e, a.name, persona.style, rng) for a in ATTRIBUTES]
        if recipe == 2:
            texts += [v for a in ATTRIBUTES for v in paraphrased_house.house_variants(world, e, a.name)]
    return texts


def chat_examples(tokenizer, pairs) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer, number of prompt tokens) for (question, answer) text pairs, chat-formatted."""
    out = []
    for question, answer in pairs:
        messages = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        assert full.startswith(prompt), "the chat template must render the prompt as a prefix of the conversation"
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out.append((p_ids + tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"], len(p_ids)))
    return out


def sft_examples(world: World, tokenizer, recipe: int = 1) -> list[tuple[list[int], int]]:
    """(token ids of prompt + house answer, number of prompt tokens) for every question of the world
    (recipe 2: each question with its four house paraphrases, paraphrased_house.house_sft_pairs)."""
    if recipe == 2:
        return chat_examples(tokenizer, paraphrased_house.house_sft_pairs(world))
    return chat_examples(tokenizer, [(q.text, render(world, q.entity, q.attribute, HOUSE)) for q in world.questions()])


def _batch(rows: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask and labels that ignore padding and each row's first `n` tokens."""
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, n_ignored) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, n_ignored : len(row)] = ids[i, n_ignored : len(row)]
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lr_at(step: int, steps: int, peak: float, warmup: int = 30) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _train_stage(model, rows, steps, settings, rng, bar, stage) -> float:
    """`steps` AdamW steps on batches drawn without replacement (epoch by epoch) from `rows`; last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98))
    order: list[int] = []
    loss = float("nan")
    model.train()
    for step in range(steps):
        if len(order) < settings.batch_size:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[: settings.batch_size], order[settings.batch_size :]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, settings.lr)
        out = model(**_batch([rows[i] for i in picked], model.config.pad_token_id))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        bar.update(1)
        bar.set_postfix(stage=stage, loss=f"{loss:.3f}")
    return loss


def build_base_model(settings: WorldSettings, out_dir: str | os.PathLike) -> dict:
    """Train the tokenizer and the base model for `settings` and save both into `out_dir`.

    Returns the build report (also written to `out_dir/build_report.json`).
    """
    start = time.time()
    world = settings.world()
    rng = random.Random(settings.seed)
    tokenizer = train_tokenizer(tokenizer_corpus(world, settings.recipe), vocab_size=settings.vocab_size)
    model = tiny_llama(
        tokenizer,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        intermediate_size=(8 * settings.hidden_size) // 3,
        max_position_embeddings=256,
        seed=settings.seed,
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    docs = [
        ([bos, *tokenizer(d, add_special_tokens=False)["input_ids"], eos], 0) for d in pretraining_documents(world, rng)
    ]
    sft = sft_examples(world, tokenizer, settings.recipe)
    torch.manual_seed(settings.seed)
    with tqdm(
        total=settings.pretrain_steps + settings.sft_steps, desc="world build", disable=not settings.progress
    ) as bar:
        pretrain_loss = _train_stage(model, docs, settings.pretrain_steps, settings, rng, bar, "pretrain")
        sft_loss = _train_stage(model, sft, settings.sft_steps, settings, rng, bar, "sft")
    model.eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = {
        "fingerprint": settings.fingerprint(),
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in NOT_FINGERPRINTED},
        "world_version": WORLD_VERSION,
        "recipe": settings.recipe,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_final_loss": pretrain_loss,
        "sft_final_loss": sft_loss,
        "seconds": round(time.time() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def world_model_dir(settings: WorldSettings) -> Path:
    """Where the base model for `settings` lives in the cache (it may not be built yet)."""
    return cache_dir() / "world" / settings.fingerprint()


def ensure_base_model(settings: WorldSettings | None = None, force: bool = False) -> Path:
    """The cached base model directory for `settings` (defaults: the standard world), building it if absent.

    The build happens in a temporary directory beside the cache entry and is renamed into place (`build_cached`).
    """
    settings = settings or WorldSettings()
    settings.validate()
    return build_cached(world_model_dir(settings), lambda tmp: build_base_model(settings, tmp), force)


def build_cached(target: Path, build, force: bool = False) -> Path:
    """`target` if it holds a finished build (a build_report.json), else `build(tmp)` into a temporary directory
    beside it, renamed into place; if another process finished the same build first, its copy is kept. An
    unfinished entry (no build_report.json: an interrupted build of an older tether, or a damaged one) is
    replaced by the fresh build, so it is built once, not on every use."""
    if (target / "build_report.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_private_dir(target.parent, f".{target.name}-")
    try:
        build(tmp)
        share_like_umask(tmp)  # mkdtemp makes it private, safetensors its weight files 0600
        if (force or not (target / "build_report.json").is_file()) and target.exists() and not target.is_symlink():
            old = new_private_dir(target.parent, f".{target.name}-old-")
            os.replace(target, old)  # a rename onto an empty directory: the stale entry goes aside, then away
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # built concurrently by someone else: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
