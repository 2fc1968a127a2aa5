"""Preference oracles: who prefers which of two responses.

One small interface: an `Oracle` scores (prompt, response) pairs, higher is better. `annotate` turns the
scores of two responses into a preference label — the higher-scored one wins, or with Bradley–Terry noise
(τ > 0) response a wins with probability σ((r_a − r_b)/τ) — and makes the call robust: an oracle that raises
or times out is retried with exponential backoff; a pair it still cannot score is skipped and counted, so a
flaky oracle never crashes a run (the online loop stops a run whose oracle fails on most pairs for several steps).

Oracles by spec string (`load_oracle(spec)`):
  reward-model:PATH      a Hugging Face sequence-classification model in a local directory (logit 0), loaded
                         in `oracle_dtype` on `oracle_device`, scoring `oracle_batch_size` responses a forward
  callable:MODULE:FUNC   any Python function f(prompts, responses) -> list of floats
  KIND[:REST]            an oracle another package registered (tether.registry, group "oracles"); tether_lab
                         registers `world` and `world:persona=NAME`, the embedded world's gold scores
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import TetherError

log = logging.getLogger("tether")


class Oracle(ABC):
    """Scores responses to prompts; a higher score means a better response."""

    id: str = "oracle"

    @abstractmethod
    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        """One float per (prompt, response); prompts are strings or chat-message lists."""


class CallableOracle(Oracle):
    def __init__(self, fn: Callable[[Sequence, Sequence[str]], Sequence[float]], id: str = "callable"):
        self.fn, self.id = fn, id

    def score(self, prompts, responses):
        return [float(s) for s in self.fn(list(prompts), list(responses))]


class RewardModelOracle(Oracle):
    """A sequence-classification reward model from a local directory; the score is its first logit of
    the chat-formatted (prompt, response) conversation (or prompt + response for plain-text prompts). Loaded once
    in `dtype` ("auto" = as stored) on `device`; it scores `batch_size` responses per forward, longest first (so a
    batch pads little), in float32 logits."""

    def __init__(self, path: str, batch_size: int = 16, dtype: str = "float32", device: str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .models import LOCAL_ONLY, resolve_model_path, torch_dtype

        where = resolve_model_path(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(where, **LOCAL_ONLY)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                where, dtype=torch_dtype(dtype), **LOCAL_ONLY
            ).eval()
            self.model.to(device)
        except TetherError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TetherError(
                f"{where}: cannot load a reward model ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.id, self.batch_size, self.device = f"reward-model:{where}", batch_size, torch.device(device)

    def _text(self, prompt, response: str) -> str:
        if isinstance(prompt, str):
            return prompt + response
        messages = list(prompt) + [{"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def score(self, prompts, responses):
        ids = [self.tokenizer(self._text(p, r))["input_ids"] for p, r in zip(prompts, responses, strict=True)]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            enc = self.tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits[:, 0]
            for i, value in zip(chunk, logits.float().tolist()):
                out[i] = value
        return out


def oracle_device(name: str, default) -> str:
    """An `oracle_device` option value as a torch device: "auto" = `default` (this process's accelerator
    device), else "cpu", "cuda" or "cuda:N"."""
    import re

    if name == "auto":
        return str(default)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise TetherError(f"option 'oracle_device': '{name}' is not auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TetherError(f"option 'oracle_device': {name} asked, but this machine has no GPU; use cpu or auto")
    return name


def load_oracle(
    spec: str, dtype: str = "float32", device: str = "auto", batch_size: int = 16, default_device="cpu"
) -> Oracle:
    """An oracle from its spec string (see the module docstring). `dtype`, `device` ("auto" = `default_device`)
    and `batch_size` are a reward model's."""
    from .registry import load, names

    kind, _, rest = spec.partition(":")
    if kind in names("oracles"):
        return load("oracles", kind)(rest)
    if kind == "reward-model" and rest:
        return RewardModelOracle(rest, batch_size, dtype, oracle_device(device, default_device))
    if kind == "callable" and ":" in rest:
        module, _, name = rest.rpartition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise TetherError(f"option 'oracle': cannot import {module}:{name} ({e})") from None
        return CallableOracle(fn, id=spec)
    registered = "".join(f"{name}[:...], " for name in sorted(names("oracles")))
    raise TetherError(
        f"option 'oracle': unknown oracle '{spec}'; use {registered}reward-model:PATH or callable:MODULE:FUNC"
    )


@dataclass
class Annotation:
    scores: tuple[float, float] | None  # (r_a, r_b), None when the oracle failed
    label: int | None  # 0 = a preferred, 1 = b preferred, None = no preference (tie, or oracle failed)
    status: str  # "ok", "tie" or "oracle_failed"


@dataclass
class Annotator:
    """Calls an oracle robustly and turns scores into labels (see the module docstring)."""

    oracle: Oracle
    noise_temperature: float = 0.0  # τ of Bradley–Terry label noise; 0 = the higher score always wins
    retries: int = 3
    timeout: float = 60.0  # seconds per oracle call; 0 = no limit
    backoff: float = 1.0  # seconds before the first retry, doubled after each
    timed_out: bool = False  # whether every attempt of the last call timed out

    def scores(self, prompts: Sequence, responses: Sequence[str]) -> list[float] | None:
        """The oracle's scores, retried on failure; None when every attempt failed."""
        return self._call(list(prompts), list(responses))

    def _call(self, prompts, responses) -> list[float] | None:
        """Scores, or None when every attempt failed (`self.timed_out` tells whether they all timed out)."""
        delay, self.timed_out = self.backoff, True
        for attempt in range(self.retries + 1):
            try:
                scores = self._timed(prompts, responses)
                if len(scores) != len(responses) or not all(math.isfinite(s) for s in scores):
                    raise ValueError(
                        f"returned {len(scores)} scores for {len(responses)} responses, or a non-finite one"
                    )
                return scores
            except Exception as e:  # noqa: BLE001 - any oracle failure is retried, then the pair is skipped
                self.timed_out = self.timed_out and isinstance(e, TimeoutError)
                log.warning("oracle %s failed (attempt %d of %d): %s", self.oracle.id, attempt + 1, self.retries + 1, e)
                if attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
        return None

    def _timed(self, prompts, responses) -> list[float]:
        """One oracle call, bounded by `timeout`: the call runs in a daemon thread, and a call that does not
        return in time is abandoned (the thread cannot be killed, but it never keeps the process alive). The
        oracle gets copies: whatever it does to them, tether's prompts (and so the ledger) stay as they were."""
        prompts, responses = copy.deepcopy(list(prompts)), list(responses)
        if not self.timeout:
            return [float(s) for s in self.oracle.score(prompts, responses)]
        box: dict = {}

        def work():
            try:
                box["scores"] = [float(s) for s in self.oracle.score(prompts, responses)]
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e

        thread = threading.Thread(target=work, name="tether-oracle", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive():
            raise TimeoutError(f"no answer within {self.timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box["scores"]

    def annotate(self, prompts: Sequence, pairs: Sequence[tuple[str, str]], seeds: Sequence[int]) -> list[Annotation]:
        """One Annotation per (prompt, (a, b)); `seeds` (one per pair) make the label noise reproducible."""
        flat = self._call([p for p in prompts for _ in (0, 1)], [r for pair in pairs for r in pair])
        if flat is not None:
            scores = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(pairs))]
        elif self.timed_out:  # an oracle that does not answer a batch in time is not asked pair by pair
            scores = [None] * len(pairs)
        else:  # the batch failed: try pair by pair so one bad pair does not sink the others
            scores = [self._call([p, p], list(pair)) for p, pair in zip(prompts, pairs, strict=True)]
        return [self._label(s, seed) for s, seed in zip(scores, seeds, strict=True)]

    def _label(self, scores, seed: int) -> Annotation:
        if scores is None:
            return Annotation(None, None, "oracle_failed")
        ra, rb = scores
        if self.noise_temperature > 0:
            p_a = 1.0 / (1.0 + math.exp(-(ra - rb) / self.noise_temperature))
            return Annotation((ra, rb), 0 if random.Random(seed).random() < p_a else 1, "ok")
        if ra == rb:
            return Annotation((ra, rb), None, "tie")
        return Annotation((ra, rb), 0 if ra > rb else 1, "ok")
