"""The online (BPO) training configuration: every option with its default and meaning, checked in `validate`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ..config import TetherError, option
from ..loss_table import needs_reference, reference_free_names
from .train_config import CommonConfig

REFERENCES = ("behavior", "initial", "fixed", "ema", "none")


@dataclass
class OnlineConfig(CommonConfig):
    output_dir: str = option(
        "runs/online", "run directory: config.yaml, ledger.jsonl, metrics.jsonl, checkpoints/, final/"
    )
    prompt_file: str = option(
        "", "training prompts: .jsonl/.json/.parquet/datasets dir with a 'prompt' field (required)"
    )
    eval_file: str | None = option(None, "evaluation prompts with a 'reference' text each; null = no evaluation")
    eval_prompts: int = option(0, "evaluate on the first N prompts of eval_file; 0 = all")
    oracle: str = option(
        "", "who labels pairs: world | world:persona=NAME | reward-model:PATH | callable:MODULE:FUNC (required)"
    )
    oracle_dtype: str = option(
        "float32",
        "dtype a reward-model oracle is loaded in (auto = as stored)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    oracle_device: str = option(
        "auto", "where a reward-model oracle runs: auto (the main process's GPU, else the CPU), cpu, cuda or cuda:N"
    )
    oracle_batch_size: int = option(16, "responses a reward-model oracle scores per forward")
    oracle_noise: float = option(0.0, "τ of Bradley–Terry label noise: a wins with prob σ((r_a − r_b)/τ); 0 = none")
    oracle_retries: int = option(3, "retries of a failing or timed-out oracle call before the pair is skipped")
    oracle_timeout: float = option(60.0, "seconds an oracle call may take; 0 = no limit")
    oracle_backoff: float = option(1.0, "seconds before the first retry (doubled after each)")
    max_oracle_failure_rate: float = option(
        0.5,
        "stop the run (non-zero exit, after a checkpoint) when the oracle fails on more than this fraction of a "
        "step's pairs for oracle_failure_patience steps in a row; 1 = never stop",
    )
    oracle_failure_patience: int = option(
        3, "consecutive failing steps before the run stops (see max_oracle_failure_rate)"
    )
    # the BPO schedule (docs/methods.md §5)
    steps: int = option(100, "T: optimizer steps; the annotation budget is prompts_per_step × steps")
    phases: int = option(2, "F: data-collection phases; π_β ← π_θ every K = steps / phases steps (1 = offline)")
    prompts_per_step: int = option(16, "B: new prompts per step over all processes (2 responses sampled for each)")
    reference: str = option(
        "behavior",
        "π_ref of the loss: behavior (BPO: π_β), initial (π_sft: on-policy DAP), fixed (ref_model), ema, or none "
        f"(only for a loss that uses no reference: {', '.join(reference_free_names())})",
        choices=REFERENCES,
    )
    ref_model: str | None = option(None, "the fixed reference model directory (reference: fixed)")
    ema_rate: float = option(0.1, "α of the EMA reference: π_ref ← (1 − α) π_ref + α π_θ after every step")
    # sampling from π_β
    temperature: float = option(1.0, "sampling temperature")
    top_k: int = option(50, "top-k sampling (0 = off)")
    top_p: float = option(1.0, "nucleus sampling threshold (1 = off)")
    max_new_tokens: int = option(128, "max tokens of a sampled response")
    # LoRA ensemble (the official BPO code's stabiliser)
    ensemble_size: int = option(1, "n LoRA adapters trained side by side, each with its own AdamW (n > 1 needs lora)")
    ensemble_merge: str = option(
        "linear",
        "π_β from the ensemble: linear = average A's and B's separately (PEFT linear, the paper's code); "
        "exact = average of the B·A products",
        choices=("linear", "exact"),
    )
    eval_max_new_tokens: int = option(128, "max tokens of a greedy evaluation answer")
    base_samples: ClassVar[int] = 1  # BAPO online: one greedy y_b per prompt, from π_sft (not an option)

    def validate(self) -> None:
        """The one place an OnlineConfig is checked; raises a one-line TetherError naming the option."""
        super().validate()
        if not self.prompt_file:
            raise TetherError("option 'prompt_file' is required (a file of training prompts)")
        if not self.oracle:
            raise TetherError(
                "option 'oracle' is required (world, world:persona=NAME, reward-model:PATH or callable:MODULE:FUNC)"
            )
        for name in (
            "steps",
            "phases",
            "prompts_per_step",
            "max_new_tokens",
            "eval_max_new_tokens",
            "ensemble_size",
            "temperature",
            "oracle_batch_size",
        ):
            if getattr(self, name) <= 0:
                raise TetherError(f"option '{name}' must be > 0, got {getattr(self, name)}")
        for name in ("eval_prompts", "oracle_noise", "oracle_retries", "oracle_timeout", "oracle_backoff", "top_k"):
            if getattr(self, name) < 0:
                raise TetherError(f"option '{name}' must be >= 0, got {getattr(self, name)}")
        if self.steps % self.phases:
            raise TetherError(
                f"option 'phases' ({self.phases}) must divide 'steps' ({self.steps}) "
                "so that K = steps / phases is whole"
            )
        if not 0.0 <= self.max_oracle_failure_rate <= 1.0:
            raise TetherError(f"option 'max_oracle_failure_rate' must be in [0, 1], got {self.max_oracle_failure_rate}")
        if self.oracle_failure_patience < 1:
            raise TetherError(f"option 'oracle_failure_patience' must be >= 1, got {self.oracle_failure_patience}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.oracle_device):
            raise TetherError(f"option 'oracle_device' must be auto, cpu, cuda or cuda:N, got {self.oracle_device!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise TetherError(f"option 'top_p' must be in (0, 1], got {self.top_p}")
        self._check_reference_against_loss()
        if self.reference == "fixed" and not self.ref_model:
            raise TetherError("reference: fixed needs option 'ref_model' (the fixed reference model directory)")
        if self.ref_model and self.reference != "fixed":
            raise TetherError(
                f"option 'ref_model' is used only with reference: fixed (got reference: {self.reference})"
            )
        if self.reference == "ema" and not 0.0 < self.ema_rate <= 1.0:
            raise TetherError(f"option 'ema_rate' must be in (0, 1], got {self.ema_rate}")
        if self.ensemble_size > 1 and not self.lora:
            raise TetherError("option 'ensemble_size' > 1 needs lora: true (the ensemble is of LoRA adapters)")
        if self.ensemble_size > 1 and self.use_dora:
            raise TetherError(
                "option 'ensemble_size' > 1 with use_dora: merging DoRA adapters (their magnitudes) is not defined; "
                "use one DoRA adapter or plain LoRA"
            )

    def _check_reference_against_loss(self) -> None:
        """A reference mode is the point of an online setting (BPO: π_ref = π_β): it needs a loss that reads π_ref,
        and a loss that reads none needs reference: none."""
        if self.reference != "none" and not needs_reference(self.loss):
            raise TetherError(
                f"loss {self.loss} uses no reference, so reference: {self.reference} would have no effect (the "
                f"point of that setting is π_ref); use a loss with a reference, or reference: none"
            )
        if self.reference == "none" and needs_reference(self.loss):
            raise TetherError(
                f"reference: none, but loss {self.loss} needs a reference; use a loss without one "
                f"({', '.join(reference_free_names())}) or another reference"
            )
