"""BAPO's base responses y_b (docs/methods.md §3), written by `base_answers` for both loops. Offline, before
training, the reference (base) model answers every training prompt itself, once; the answers are cached on disk
and become extra completions of each example (`attach_base_responses`). Online, π_sft answers each prompt the
first time it is drawn (greedy; the loop keeps the answers and the ledger records them).

Generation works on token ids: y_b is exactly the token sequence the base model produced from the same
(truncated) prompt tokens the policy is trained on, ending with its EOS token (or cut at
`base_max_new_tokens`). The cache key is a fingerprint of (reference weights, prompts, decoding settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from accelerate.utils import gather_object

from .data import Example
from .files import cache_dir, write_text_atomic
from .generation import generate_ids
from .models import forward_is_collective, share_of

log = logging.getLogger("tether")


def base_keys(cfg) -> tuple[str, ...]:
    """Completion keys of the base responses in both loops: ('base0', 'base1', ...), one per base sample, for
    BAPO; () otherwise."""
    return tuple(f"base{i}" for i in range(cfg.base_samples)) if cfg.method == "bapo" else ()


def add_base_completions(example: Example, responses: list[list[int]], max_length: int, eos_id: int) -> None:
    """Give `example` its base responses as completions 'base0', 'base1', ... (the keys of `base_keys`), each cut
    to fit `max_length` with the prompt like any other completion (an empty one becomes a lone EOS)."""
    room = max_length - len(example.prompt_ids)
    for j, ids in enumerate(responses):
        example.completion_ids[f"base{j}"] = (ids or [eos_id])[:room]


def _decoding(cfg) -> dict:
    sampled = cfg.base_decoding == "sampled"
    return dict(
        max_new_tokens=cfg.base_max_new_tokens,
        do_sample=sampled,
        temperature=cfg.base_temperature if sampled else 1.0,
        top_k=cfg.base_top_k if sampled else 0,
        top_p=cfg.base_top_p if sampled else 1.0,
    )


def attach_base_responses(accelerator, cfg, reference, tokenizer, example_sets: list[list[Example]]) -> None:
    """Give every example completions 'base0'.. 'base{n-1}': the reference model's own responses.

    `reference` is a LiveReference (its model generates with the adapter disabled when it is the LoRA base).
    Prompts are generated once each (deduplicated across train and eval), split over the processes (evenly when
    the model is sharded: every process makes the same generate calls), and cached; completions are cut to fit
    `max_length` like any other completion.
    """
    prompts = sorted({tuple(ex.prompt_ids) for exs in example_sets for ex in exs})
    h = hashlib.blake2b(digest_size=16)
    h.update(reference.weights_fingerprint().encode())
    h.update(json.dumps([_decoding(cfg), cfg.base_samples, cfg.seed, prompts]).encode())
    path = Path(cfg.ref_cache_dir or cache_dir() / "reflogps").parent / "base_responses" / f"{h.hexdigest()}.json"
    responses = _cached_responses(path, len(prompts), cfg.base_samples)
    if responses is not None:
        log.info("base responses reused from %s", path)
    else:
        with reference.generating() as model:  # sharded: every process generates for as many prompts
            mine, real = share_of(
                list(range(len(prompts))),
                accelerator.process_index,
                accelerator.num_processes,
                even=forward_is_collective(model),
            )
            answers = base_answers(
                model,
                tokenizer,
                [prompts[i] for i in mine],
                samples=cfg.base_samples,
                seed=cfg.seed,
                batch_size=cfg.eval_batch_size,
                progress=accelerator.is_main_process and cfg.progress,
                **_decoding(cfg),
            )
        part = dict(zip(mine[:real], answers[:real]))
        responses = {}
        for piece in gather_object([part]):
            responses.update({str(k): v for k, v in piece.items()})
        if accelerator.is_main_process:
            write_text_atomic(path, json.dumps(responses))
    index = {p: str(i) for i, p in enumerate(prompts)}
    for exs in example_sets:
        for ex in exs:
            add_base_completions(ex, responses[index[tuple(ex.prompt_ids)]], cfg.max_length, tokenizer.eos_token_id)


def _cached_responses(path: Path, n_prompts: int, n: int) -> dict | None:
    """The cached base responses, or None; a cache file that is torn or of another shape is removed (with a
    warning) and so generated again."""
    if not path.is_file():
        return None
    try:
        responses = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(responses, dict) and all(
            isinstance(responses.get(str(i)), list)
            and len(responses[str(i)]) == n
            and all(isinstance(y, list) and all(isinstance(t, int) for t in y) for y in responses[str(i)])
            for i in range(n_prompts)
        )
        if not ok:
            raise ValueError(f"not {n} token lists for each of {n_prompts} prompts")
    except ValueError as e:
        log.warning("cached base responses %s unusable (%s); generating them again", path, e)
        path.unlink(missing_ok=True)
        return None
    return responses


def base_answers(
    model,
    tokenizer,
    prompts,
    *,
    samples: int = 1,
    seed: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
    **decoding,
) -> list[list[list[int]]]:
    """y_b: `samples` answers of `model` to each prompt (token ids), each up to and including its EOS token;
    `decoding` as `generation.generate_ids` takes it (greedy unless do_sample)."""
    flat = [list(p) for p in prompts for _ in range(samples)]
    ids = generate_ids(
        model, tokenizer, flat, seed=seed, batch_size=batch_size, progress=progress, desc="base responses", **decoding
    )
    return [ids[j * samples : (j + 1) * samples] for j in range(len(prompts))]
