"""Training configurations: every option with its default and meaning, checked in `validate`.

`CommonConfig` holds what the offline (`TrainConfig`) and online (`OnlineConfig`, in online_config.py) loops
share: the model, the loss, the optimizer, LoRA and bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Checks, TetherError, brief, option
from ..loss_table import OPTION_DEFAULTS, PARAM_HELP, PARAMS, loss_help, needs_reference, resolve_options

MAX_SEED = 2**32 - 1  # numpy.random.seed takes no more (accelerate.set_seed seeds numpy)
BAPO_ANCHOR_WEIGHT = (
    0.1  # λ when method: bapo and anchor_weight is not given (the first embedded-world study's pilot choice)
)


def loss_param(name: str):
    """The option `name` of the loss (the same in `tether train`, `tether online` and `tether eval`)."""
    if name == "loss":
        return option("dpo", loss_help())
    if name == "loss_weights":
        return option(None, "weights of a mixture's losses, in order (as TRL's loss_weights); null = 1 each")
    if name == "nll_weight":
        return option(0.0, "α: weight of the NLL (−mean log-prob) of the chosen response added to the loss")
    return option(OPTION_DEFAULTS[name], PARAM_HELP[name])


def check_loss_options(cfg) -> None:
    """Check cfg's loss, loss_weights and loss parameters against the table (one-line TetherError naming the
    option); a null beta becomes the loss's default."""
    try:
        resolved = resolve_options(cfg.loss, cfg.loss_weights, {name: getattr(cfg, name) for name in PARAMS})
    except ValueError as e:
        raise TetherError(str(e)) from None
    cfg.beta = resolved["beta"]


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")  # accelerate's trackers that report_to may name


def logp_options(cfg) -> dict:
    """What `tether.logprobs.sequence_logps` takes from an offline run's options (padding, the head's chunks)."""
    return {"padding_free": cfg.padding_free, "chunk_size": cfg.logprob_chunk_size}


def loss_options(cfg) -> dict:
    """What `tether.losses.objective` / `preference_loss` take from cfg's loss options."""
    return dict(
        loss=cfg.loss, loss_weights=cfg.loss_weights, nll_weight=cfg.nll_weight, **{p: getattr(cfg, p) for p in PARAMS}
    )


@dataclass
class CommonConfig:
    model: str = option("", "policy model: a local Hugging Face directory or a built-in name (required)")
    output_dir: str = option("runs/train", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    # the loss
    loss: str = loss_param("loss")
    loss_weights: list[float] | None = loss_param("loss_weights")
    beta: float | None = loss_param("beta")
    label_smoothing: float = loss_param("label_smoothing")
    discopop_tau: float = loss_param("discopop_tau")
    simpo_gamma: float = loss_param("simpo_gamma")
    cpo_alpha: float = loss_param("cpo_alpha")
    nll_weight: float = loss_param("nll_weight")
    # BAPO: anchor the policy to the base model's own responses (docs/methods.md §3); the one switch is `method`
    method: str = option(
        "dap",
        "dap = the preference loss alone; bapo = loss + anchor_weight · anchor on the base model's own responses",
        choices=("dap", "bapo"),
    )
    anchor_weight: float | None = option(
        None,
        f"λ: weight of the BAPO anchor (method: bapo only); null = {BAPO_ANCHOR_WEIGHT} with bapo (the "
        "first embedded-world study's pilot choice; docs/bapo.md), 0 with dap",
    )
    anchor_form: str = option(
        "hinge",
        "hinge = max(0, log π_ref(y_b) − log π_θ(y_b)); squared = (log π_θ(y_b) − log π_ref(y_b))²",
        choices=("hinge", "squared"),
    )
    anchor_normalize: str = option("sum", "anchor on summed log-probs, or per-token mean", choices=("sum", "mean"))
    # tokenization
    max_length: int = option(512, "max tokens of prompt + completion; completions are cut from the right")
    max_prompt_length: int | None = option(
        None, "max prompt tokens; prompts are cut from the left; null = max_length // 2 (256 at the default max_length)"
    )
    # optimisation
    learning_rate: float = option(1e-6, "peak learning rate of AdamW")
    lr_scheduler: str = option(
        "linear", "learning-rate schedule after warm-up", choices=("linear", "cosine", "constant")
    )
    warmup_steps: int = option(0, "linear warm-up steps from 0 to learning_rate")
    warmup_ratio: float = option(0.0, "warm-up as a fraction of all steps, used when warmup_steps is 0 (as in TRL)")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this; 0 = no clipping")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW β1")
    adam_beta2: float = option(0.999, "AdamW β2")
    adam_epsilon: float = option(1e-8, "AdamW ε")
    seed: int = option(42, "seed for data order, adapter init, dropout and sampling")
    disable_dropout: bool = option(True, "set all dropout to 0 so the policy starts equal to the reference")
    mixed_precision: str = option("no", "bf16 autocast on a GPU; ignored with a warning on CPU", choices=("no", "bf16"))
    torch_dtype: str = option(
        "float32",
        "dtype the policy and reference weights are loaded in (auto = as stored in the model's config.json); "
        "LoRA adapter weights stay float32 on a bfloat16/float16 base",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    gradient_checkpointing: bool = option(
        False,
        "recompute layer activations in the backward pass instead of storing them: less memory, more time "
        "(padded batches then stop sharing the prompt between chosen and rejected; tether train's padding-free "
        "batches still share it)",
    )
    # LoRA
    lora: bool = option(False, "train a LoRA adapter (PEFT) instead of all weights")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_target_modules: list[str] | None = option(
        None, "module names to adapt, e.g. q_proj v_proj; null or all-linear = all linear layers"
    )
    use_dora: bool = option(False, "DoRA (PEFT use_dora): LoRA plus a trained magnitude per output feature (lora)")
    load_in_4bit: bool = option(
        False, "QLoRA: the base's linear weights quantized to 4 bits by bitsandbytes (lora; pip install bitsandbytes)"
    )
    bnb_4bit_quant_type: str = option("nf4", "the 4-bit number format of load_in_4bit", choices=("nf4", "fp4"))
    # bookkeeping
    eval_batch_size: int = option(16, "examples per forward when evaluating or precomputing log-probs")
    logging_steps: int = option(1, "write averaged training metrics every N optimizer steps")
    eval_steps: int = option(0, "evaluate on held-out data every N steps; 0 = only before and after training")
    save_steps: int = option(100, "write a resumable checkpoint every N steps; 0 = none")
    save_total_limit: int = option(2, "keep only the newest N checkpoints; 0 = keep all")
    report_to: list[str] = option(
        ["none"], f"also log metrics to these trackers: {', '.join(TRACKERS)} or none (a list, as in TRL)"
    )
    logging_dir: str | None = option(
        None,
        "TensorBoard's event directory; null = $TENSORBOARD_LOGGING_DIR if set (as transformers 5), else "
        "output_dir/tensorboard",
    )
    progress: bool = option(True, "show a progress bar")
    write_report: bool = option(
        True, "write report.md and plots/ at the end of the run (`tether report RUN_DIR` any time)"
    )

    def validate(self) -> None:
        """Check every option; raise one TetherError naming every problem at once. Idempotent: the defaults it
        resolves (max_prompt_length, beta, anchor_weight, report_to, lora_target_modules) stay as resolved."""
        problems = self.problems()
        if problems:
            raise TetherError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem of the options, each one phrase naming its option (`tether.config.Checks`)."""
        checks = Checks(self)
        self._check(checks)
        return list(dict.fromkeys(checks.found))

    def _check(self, c: Checks) -> None:
        """The shared options."""
        c.at_least(
            0, "learning_rate", "max_length", "eval_batch_size", "logging_steps", "lora_r", "lora_alpha", strict=True
        )
        if c.usable("max_length", "max_prompt_length") and self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2  # a TRL config sets max_length alone
        if c.usable("model") and not self.model:
            c.add("option 'model' is required (a local model directory or a built-in name)", "model")
        if c.usable("loss", "loss_weights", *PARAMS):
            try:
                check_loss_options(self)
            except TetherError as e:
                c.add(str(e), "loss")
        if self.max_prompt_length is not None:
            c.at_least(0, "max_prompt_length", strict=True)
        c.at_least(0, "warmup_steps", "eval_steps", "save_steps", "save_total_limit", "max_grad_norm", "weight_decay")
        c.at_least(0, "nll_weight")
        for name in ("adam_beta1", "adam_beta2", "lora_dropout", "warmup_ratio"):
            c.within(name, 0.0, 1.0)
        c.at_least(0, "adam_epsilon", strict=True)
        self._check_anchor(c)
        self._check_trackers(c)
        if c.usable("lora_target_modules") and self.lora_target_modules and "all-linear" in self.lora_target_modules:
            self.lora_target_modules = None  # PEFT's (and TRL's) name for every linear layer but the output head
        if c.usable("seed") and not 0 <= self.seed <= MAX_SEED:
            c.add(f"option 'seed' must be in [0, {MAX_SEED}] (numpy's seed range), got {brief(self.seed)}", "seed")
        if c.usable("max_length", "max_prompt_length") and self.max_prompt_length >= self.max_length:
            c.add(f"option 'max_prompt_length' ({self.max_prompt_length}) must be < 'max_length' ({self.max_length})")
        for name in ("use_dora", "load_in_4bit"):
            if c.usable(name, "lora") and getattr(self, name) and not self.lora:
                c.add(f"option '{name}' trains an adapter: it needs lora: true", name)

    def _check_anchor(self, c: Checks) -> None:
        if not c.usable("method", "anchor_weight"):
            return
        if self.method == "dap" and self.anchor_weight:
            c.add(
                f"option 'anchor_weight' ({self.anchor_weight}) is BAPO's anchor, but method is dap: set "
                "method: bapo, or drop anchor_weight"
            )
            return
        if self.anchor_weight is None:
            self.anchor_weight = BAPO_ANCHOR_WEIGHT if self.method == "bapo" else 0.0
        c.at_least(0, "anchor_weight")

    def _check_trackers(self, c: Checks) -> None:
        """report_to: a list of TRACKERS, or none (TRL writes one name as a string)."""
        if not c.usable("report_to"):
            return
        given = [self.report_to] if isinstance(self.report_to, str) else self.report_to or []
        trackers = [str(t).lower() for t in given if t is not None and str(t).lower() not in ("none", "no")]
        unknown = [t for t in trackers if t not in TRACKERS]
        if unknown:
            c.add(f"option 'report_to': unknown tracker '{unknown[0]}'; use {', '.join(TRACKERS)} or none", "report_to")
            return
        self.report_to = list(dict.fromkeys(trackers)) or ["none"]


@dataclass
class TrainConfig(CommonConfig):
    ref_model: str | None = option(
        None, "reference model directory; null = the initial policy (with LoRA: the base with the adapter disabled)"
    )
    train_file: str = option(
        "",
        "preference data: .jsonl, .json, .parquet, a datasets directory, or a directory of "
        "split files (train.jsonl, data/train-*.parquet); PATH:SPLIT picks a split (required)",
    )
    train_split: str = option("train", "split of train_file to train on, when it holds splits")
    eval_file: str | None = option(None, "held-out preference data, same formats; null = none (see eval_fraction)")
    eval_split: str = option(
        "test", "split of eval_file to evaluate on, when it holds splits (a missing split is an error)"
    )
    eval_fraction: float = option(0.0, "when eval_file is null, hold out this fraction of train_file for evaluation")
    # how the base model writes its responses y_b for BAPO (method: bapo)
    base_decoding: str = option("greedy", "how the base model writes its responses y_b", choices=("greedy", "sampled"))
    base_samples: int = option(1, "base responses per prompt (more than 1 needs base_decoding: sampled)")
    base_max_new_tokens: int = option(128, "max new tokens of a base response")
    base_temperature: float = option(1.0, "sampling temperature of base responses (sampled only)")
    base_top_k: int = option(50, "top-k of base responses (sampled only; 0 = off)")
    base_top_p: float = option(1.0, "top-p of base responses (sampled only; 1 = off)")
    # optimisation
    num_epochs: float = option(1.0, "passes over the training data (used when max_steps is -1)")
    max_steps: int = option(
        -1,
        "optimizer steps to run; -1 = derive from num_epochs; 0 = no training step, as in "
        "HF/TRL (the model is evaluated and saved unchanged)",
    )
    batch_size: int = option(8, "preference pairs per process per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    # the reference
    precompute_ref_logps: bool = option(True, "compute reference log-probs once before training and cache them on disk")
    ref_cache_dir: str | None = option(None, "where cached reference log-probs live; null = $TETHER_CACHE/reflogps")
    # how the log-probs are computed (the same numbers within float rounding; docs/training.md, "Speed")
    padding_free: bool = option(
        True,
        "pack each batch's sequences into rows without padding (block-diagonal causal attention, each prompt "
        "once for its completions; sdpa or eager attention, flash/flex through position_ids); false = padded rows",
    )
    logprob_chunk_size: int = option(
        256,
        "completion positions whose LM-head logits are computed together (the float32 positions × vocabulary "
        "logits of only this many are held at once); 0 = all at once",
    )

    def _check(self, c: Checks) -> None:
        """The offline options (after the shared ones)."""
        super()._check(c)
        if c.usable("train_file") and not self.train_file:
            c.add("option 'train_file' is required (a preference data file)", "train_file")
        c.at_least(0, "batch_size", "gradient_accumulation_steps", "base_temperature", strict=True)
        c.within("eval_fraction", 0.0, 1.0)
        if c.usable("max_steps") and self.max_steps < -1:
            c.add(f"option 'max_steps' must be >= 0, or -1 to derive it from num_epochs; got {self.max_steps}")
        if c.usable("max_steps", "num_epochs") and self.max_steps == -1 and self.num_epochs <= 0:
            c.add("set 'max_steps' >= 0 or 'num_epochs' > 0")
        c.at_least(0, "base_top_k", "logprob_chunk_size")
        c.within("base_top_p", 0.0, 1.0, low_open=True, high_open=False)
        if c.usable("ref_model", "loss") and self.ref_model and not needs_reference(self.loss):
            c.add(f"option 'ref_model': loss {self.loss} uses no reference (it is trained without one); drop ref_model")
        if self.method == "bapo" and c.usable("base_samples", "base_max_new_tokens", "base_decoding"):
            if self.base_samples < 1 or self.base_max_new_tokens < 1:
                c.add("options 'base_samples' and 'base_max_new_tokens' must be >= 1")
            elif self.base_samples > 1 and self.base_decoding != "sampled":
                c.add("option 'base_samples' > 1 needs base_decoding: sampled (greedy gives one response)")
