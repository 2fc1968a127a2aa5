"""The online (BPO) training configuration: every option with its default and meaning, checked in `validate`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import ClassVar

from ..config import Checks, option
from ..loss_table import needs_reference, reference_free_names
from ..trl_key_table import ONLINE_TRL_KEYS
from .train_config import CommonConfig

REFERENCES = ("behavior", "initial", "fixed", "ema", "none")
SAMPLERS = ("tether", "vllm")


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
    sampler: str = option(
        "tether",
        "who samples from π_β: tether (its own sampler, the reference) or vllm (a vLLM server: vllm_url or "
        "vllm_python; docs/scaling.md)",
        choices=SAMPLERS,
    )
    vllm_url: str | None = option(
        None, "sampler vllm: a running server, e.g. http://127.0.0.1:8000 (tether vllm-serve)"
    )
    vllm_python: str | None = option(
        None, "sampler vllm: the python of a vLLM environment (make vllm); tether starts a server for the run"
    )
    vllm_args: str = option(
        "",
        "more of vLLM's own flags for the server tether starts, e.g. '--max-num-seqs 64' (without a GPU, chunked "
        "prefill is switched off unless these flags say otherwise: docs/scaling.md)",
    )
    vllm_logprobs: str = option(
        "trainer",
        "log π_β of the sampled responses: trainer (re-scored by the trainer's model: exact) or engine (the "
        "server's; the gap to the trainer's is measured after each weight sync and logged)",
        choices=("trainer", "engine"),
    )
    vllm_timeout: float = option(600.0, "seconds a vLLM request, or the start of tether's own server, may take")
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
    trl_keys: ClassVar[dict] = ONLINE_TRL_KEYS  # TRL's names `tether online` reads (OnlineDPOConfig's too)

    def _check(self, c: Checks) -> None:
        """The online options (after the shared ones)."""
        super()._check(c)
        if c.usable("prompt_file") and not self.prompt_file:
            c.add("option 'prompt_file' is required (a file of training prompts)", "prompt_file")
        if c.usable("oracle") and not self.oracle:
            c.add(
                "option 'oracle' is required (world, world:persona=NAME, reward-model:PATH or callable:MODULE:FUNC)",
                "oracle",
            )
        positive = ("steps", "phases", "prompts_per_step", "max_new_tokens", "eval_max_new_tokens", "ensemble_size")
        positive += ("oracle_batch_size",)
        c.at_least(0, *positive, "temperature", strict=True)
        c.at_least(0, "eval_prompts", "oracle_noise", "oracle_retries", "oracle_timeout", "oracle_backoff", "top_k")
        if c.usable("steps", "phases") and self.phases > 0 and self.steps % self.phases:
            c.add(
                f"option 'phases' ({self.phases}) must divide 'steps' ({self.steps}) "
                "so that K = steps / phases is whole"
            )
        c.within("max_oracle_failure_rate", 0.0, 1.0, high_open=False)
        c.at_least(1, "oracle_failure_patience")
        c.within("top_p", 0.0, 1.0, low_open=True, high_open=False)
        if c.usable("oracle_device") and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.oracle_device):
            c.add(
                f"option 'oracle_device' must be auto, cpu, cuda or cuda:N, got {self.oracle_device!r}", "oracle_device"
            )
        if c.usable("reference", "loss"):
            self._check_reference_against_loss(c)
        if self.reference == "fixed" and not self.ref_model:
            c.add("reference: fixed needs option 'ref_model' (the fixed reference model directory)")
        if self.ref_model and self.reference != "fixed":
            c.add(f"option 'ref_model' is used only with reference: fixed (got reference: {self.reference})")
        if self.reference == "ema":
            c.within("ema_rate", 0.0, 1.0, low_open=True, high_open=False)
        if c.usable("ensemble_size", "lora") and self.ensemble_size > 1 and not self.lora:
            c.add("option 'ensemble_size' > 1 needs lora: true (the ensemble is of LoRA adapters)")
        if c.usable("ensemble_size", "use_dora") and self.ensemble_size > 1 and self.use_dora:
            c.add(
                "option 'ensemble_size' > 1 with use_dora: merging DoRA adapters (their magnitudes) is not defined; "
                "use one DoRA adapter or plain LoRA"
            )
        if c.usable("sampler", "vllm_url", "vllm_python"):
            self._check_sampler(c)

    def _check_sampler(self, c: Checks) -> None:
        """sampler: vllm takes exactly one server (vllm_url or vllm_python); the vllm_ options need it."""
        c.at_least(0, "vllm_timeout", strict=True)
        given = [name for name in ("vllm_url", "vllm_python") if getattr(self, name)]
        if self.sampler != "vllm":
            if given:
                c.add(f"option '{given[0]}' is used only with sampler: vllm (got sampler: {self.sampler})", given[0])
            return
        if len(given) != 1:
            c.add(
                "sampler: vllm needs exactly one of vllm_url (a running server: tether vllm-serve) and vllm_python "
                "(tether starts one)" + ("; got both" if given else "")
            )
        if self.vllm_url and not self.vllm_url.startswith(("http://", "https://")):
            c.add(f"option 'vllm_url' ({self.vllm_url}) must start with http:// or https://", "vllm_url")
        if self.vllm_python and not (os.path.isfile(self.vllm_python) and os.access(self.vllm_python, os.X_OK)):
            c.add(
                f"option 'vllm_python' ({self.vllm_python}): not an executable file; give the python of an "
                "environment with vLLM (make vllm builds .venv-vllm)",
                "vllm_python",
            )

    def _check_reference_against_loss(self, c: Checks) -> None:
        """A reference mode is the point of an online setting (BPO: π_ref = π_β): it needs a loss that reads π_ref,
        and a loss that reads none needs reference: none."""
        try:
            needed = needs_reference(self.loss)
        except ValueError:
            return  # the loss itself is reported
        if self.reference != "none" and not needed:
            c.add(
                f"loss {self.loss} uses no reference, so reference: {self.reference} would have no effect (the "
                f"point of that setting is π_ref); use a loss with a reference, or reference: none"
            )
        if self.reference == "none" and needed:
            c.add(
                f"reference: none, but loss {self.loss} needs a reference; use a loss without one "
                f"({', '.join(reference_free_names())}) or another reference"
            )
