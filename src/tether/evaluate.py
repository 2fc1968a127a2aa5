"""Evaluation primitives that work on any causal LM with a chat template.

- `bootstrap_ci`: percentile-bootstrap confidence interval of a mean.
- `completion_logps` / `multiple_choice_accuracy`: knowledge as 4-way multiple choice, each option scored by
  its summed completion log-likelihood after the chat-rendered question (the lm-eval-harness convention).
- `score_responses` / `win_rates`: turn gold-reward scores into summaries and pairwise win rates.

The embedded world's suite (tether.world.evaluation) is built from these; so can any other suite.
Every summary is a plain dict of floats, so results serialise to JSON as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .data import Example, collate
from .generation import prompt_ids
from .logprobs import sequence_logps


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and its (1 − alpha) percentile-bootstrap interval.

    Resamples len(values) items with replacement `n_boot` times from a seeded generator; lo and hi are
    the alpha/2 and 1 − alpha/2 quantiles of the resampled means. Empty input gives NaNs.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


def summarize(values: Sequence[float], seed: int = 0) -> dict:
    """{"mean", "ci95_low", "ci95_high", "n"} of per-item values (95% percentile bootstrap)."""
    mean, lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": mean, "ci95_low": lo, "ci95_high": hi, "n": len(values)}


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: Sequence, completions: Sequence[str], batch_size: int = 32) -> list[float]:
    """Summed log π(completion | prompt) for each (prompt, completion) pair.

    Prompts are strings or chat messages (rendered with the generation prompt, as in `generate`);
    completions are tokenized on their own and appended, so every pair shares the prompt's tokens exactly.
    """
    return completion_logps_ids(
        model, [prompt_ids(tokenizer, p) for p in prompts],
        [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions], _pad_id(tokenizer), batch_size,
    )


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def completion_logps_ids(model, prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int, batch_size: int = 32) -> list[float]:
    """`completion_logps` on token ids. Rows are sorted by length and right-padded, as `sequence_logps` expects."""
    rows = [Example(list(p), {"completion": list(c)}, "") for p, c in zip(prompts, completions, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids) + len(rows[i].completion_ids["completion"]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([rows[i] for i in idx], pad_id, keys=("completion",))
        sums, _ = sequence_logps(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")))
        for r, i in enumerate(idx):
            out[i] = float(sums[r])
    model.train(was_training)
    return out


@torch.no_grad()
def sampled_kl(policy, base, tokenizer, prompts: Sequence, *, max_new_tokens: int = 64, seed: int = 0, batch_size: int = 16) -> list[float]:
    """Monte-Carlo KL(π_θ ‖ π_base) per prompt, in nats per response: one response y ~ π_θ (temperature 1, no
    top-k/top-p), log π_θ(y|x) − log π_base(y|x). Unbiased per prompt; average over prompts for the estimate."""
    from .generation import eos_token_ids
    from .sampling import sample_responses

    ids = [prompt_ids(tokenizer, p) for p in prompts]
    pad, eos = _pad_id(tokenizer), eos_token_ids(policy, tokenizer)
    ys, mine = [], []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        s = sample_responses(policy, chunk, [seed * 1_000_003 + start + i for i in range(len(chunk))], n=1,
                             max_new_tokens=max_new_tokens, top_k=0, eos_ids=eos, pad_id=pad)
        ys += [y[0] for y in s.ids]
        mine += [lp[0] for lp in s.logps]
    theirs = completion_logps_ids(base, ids, ys, pad, batch_size)
    return [a - b for a, b in zip(mine, theirs)]


def multiple_choice_correct(model, tokenizer, questions: Sequence[dict], batch_size: int = 32) -> list[float]:
    """1.0 where the highest-likelihood option is the right one, else 0.0, per question.

    A question is {"prompt": str | chat messages, "options": [str, ...], "answer": index of the right option}.
    """
    prompts = [q["prompt"] for q in questions for _ in q["options"]]
    options = [o for q in questions for o in q["options"]]
    logps = completion_logps(model, tokenizer, prompts, options, batch_size)
    correct, k = [], 0
    for q in questions:
        scores = logps[k : k + len(q["options"])]
        k += len(q["options"])
        correct.append(float(int(np.argmax(scores)) == q["answer"]))
    return correct


def multiple_choice_accuracy(model, tokenizer, questions: Sequence[dict], batch_size: int = 32) -> dict:
    """Accuracy over `questions` (see `multiple_choice_correct`) with its 95% bootstrap CI: `summarize`'s dict."""
    return summarize(multiple_choice_correct(model, tokenizer, questions, batch_size))


def score_responses(score: Callable[[object, str], float], prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """score(prompt, response) for each pair."""
    return [float(score(p, r)) for p, r in zip(prompts, responses, strict=True)]


def win_rates(scores: Sequence[float], other_scores: Sequence[float]) -> list[float]:
    """Per item: 1 if scores beat other_scores, 0.5 on a tie, 0 otherwise (mean = win rate, ties split)."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, other_scores, strict=True)]
