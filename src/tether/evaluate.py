"""Evaluation primitives that work on any causal LM with a chat template.

- `completion_logps` / `multiple_choice_accuracy`: knowledge as 4-way multiple choice, each option scored by
  its summed completion log-likelihood after the chat-rendered question (the lm-eval-harness convention).
- `score_responses`: gold-reward scores of responses (summaries and win rates: tether.stats).

The embedded world's suite (tether_lab.world.evaluation) is built from these; so can any other suite.
Every summary is a plain dict of floats, so results serialise to JSON as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .generation import prompt_ids
from .logprobs import completion_logps_ids, grouped_completion_logps
from .stats import summarize


@torch.no_grad()
def completion_logps(
    model, tokenizer, prompts: Sequence, completions: Sequence[str], batch_size: int = 32
) -> list[float]:
    """Summed log π(completion | prompt) for each (prompt, completion) pair.

    Prompts are strings or chat messages (rendered with the generation prompt, as in `generate`);
    completions are tokenized on their own and appended, so every pair shares the prompt's tokens exactly.
    """
    return completion_logps_ids(
        model,
        [prompt_ids(tokenizer, p) for p in prompts],
        [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions],
        _pad_id(tokenizer),
        batch_size,
    )


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def sampled_kl(
    policy, base, tokenizer, prompts: Sequence, *, max_new_tokens: int = 64, seed: int = 0, batch_size: int = 16
) -> list[float]:
    """Monte-Carlo KL(π_θ ‖ π_base) per prompt, in nats per response: one response y ~ π_θ (temperature 1, no
    top-k/top-p), log π_θ(y|x) − log π_base(y|x). Unbiased per prompt; average over prompts for the estimate."""
    from .generation import eos_token_ids
    from .sampling import sample_responses

    ids = [prompt_ids(tokenizer, p) for p in prompts]
    pad, eos = _pad_id(tokenizer), eos_token_ids(policy, tokenizer)
    ys, mine = [], []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        s = sample_responses(
            policy,
            chunk,
            [seed * 1_000_003 + start + i for i in range(len(chunk))],
            n=1,
            max_new_tokens=max_new_tokens,
            top_k=0,
            eos_ids=eos,
            pad_id=pad,
        )
        ys += [y[0] for y in s.ids]
        mine += [lp[0] for lp in s.logps]
    theirs = completion_logps_ids(base, ids, ys, pad, batch_size)
    return [a - b for a, b in zip(mine, theirs)]


def multiple_choice_correct(model, tokenizer, questions: Sequence[dict], batch_size: int = 32) -> list[float]:
    """1.0 where the highest-likelihood option is the right one, else 0.0, per question.

    A question is {"prompt": str | chat messages, "options": [str, ...], "answer": index of the right option}.
    Questions with the same number of options are scored together, each prompt run once for all its options
    (`grouped_completion_logps`); `batch_size` counts questions.
    """
    correct = [0.0] * len(questions)
    by_count: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        by_count.setdefault(len(q["options"]), []).append(i)
    for idx in by_count.values():
        scores = grouped_completion_logps(
            model,
            [prompt_ids(tokenizer, questions[i]["prompt"]) for i in idx],
            [[tokenizer(o, add_special_tokens=False)["input_ids"] for o in questions[i]["options"]] for i in idx],
            _pad_id(tokenizer),
            batch_size,
        )
        for i, s in zip(idx, scores, strict=True):
            correct[i] = float(int(np.argmax(s)) == questions[i]["answer"])
    return correct


def multiple_choice_accuracy(model, tokenizer, questions: Sequence[dict], batch_size: int = 32) -> dict:
    """Accuracy over `questions` (see `multiple_choice_correct`) with its 95% bootstrap CI: `summarize`'s dict."""
    return summarize(multiple_choice_correct(model, tokenizer, questions, batch_size))


def score_responses(score: Callable[[object, str], float], prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """score(prompt, response) for each pair."""
    return [float(score(p, r)) for p, r in zip(prompts, responses, strict=True)]
