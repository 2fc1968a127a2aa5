"""The models of an online run: the trained policy π_θ, the behavior snapshot π_β and the reference π_ref.

Full fine-tuning: π_θ is the model; π_β is a frozen copy taken at each phase start (only when K > 1 — with
K = 1 the policy at sampling time IS π_β); π_sft and the moving averages of π_θ a reference asks for (an `ema`
reference) are frozen copies.

LoRA: π_θ is n adapters on one base ("default", "e1", …, each from its own seed, each with its own AdamW and
schedule, each taking one step per batch on the same pairs). π_β is one more adapter, "behavior", holding the
merged ensemble at the phase start — an adapter copy, never a model copy:
    linear  A_β = mean_i A_i, B_β = Σ_i B_i           → ΔW_β = (s/n)(Σ_i B_i)(Σ_j A_j)
            (PEFT add_weighted_adapter "linear" with weights 1/n, as in the paper's code; cross terms included)
    exact   A_β = [A_1; …; A_n], B_β = [B_1 … B_n]/n  → ΔW_β = (s/n) Σ_i B_i A_i      (rank n·r, alpha n·alpha)
With n = 1 both are a plain copy. π_sft is the base with adapters disabled; a moving average is one more adapter;
the evaluated and exported model is the merged ensemble ("merged" adapter when n > 1).

Sharded weights (FSDP2, `shard` given): the policy and every frozen copy are sharded the same way, so a
snapshot or an EMA step is an elementwise op on each process's own shards; merging adapters needs whole LoRA
factors, which every process gathers (they are small), merges, and keeps its own shard of. Every process makes
the same forward calls (the loop pads an idle process with a zero-weight pair).

Which reference the loss uses is not this module's business: `reference.online_reference` builds it on the
policy (`initial`, `average`, `update_average`), and `reference.policy_copies_needed` says what the policy must
keep for it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import warnings
from pathlib import Path

import torch

from ..logprobs import pair_logit_means, sequence_logps
from ..losses import objective
from ..models import disable_dropout, eval_mode, is_sharded, reshard, to_device
from .checkpoint import full_tensor, shard_like, whole_tensors
from .optimization import check_finite_step, load_policy, make_optimizer, objective_options


def _snapshot(model):
    """A copy of `model` that is never trained: eval mode, no gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)


class StateList:
    """Several optimizers (or schedulers) checkpointed as one."""

    def __init__(self, items):
        self.items = list(items)

    def state_dict(self):
        return [x.state_dict() for x in self.items]

    def load_state_dict(self, states):
        for x, s in zip(self.items, states, strict=True):
            x.load_state_dict(s)


class OnlinePolicy:
    """π_θ (n adapters, or the model), π_β, and what a reference needs: π_sft when `keep_initial` (a frozen copy
    with full fine-tuning; with LoRA the base is always at hand), and one moving average of π_θ per name in
    `averages` (an adapter with LoRA, a frozen copy otherwise) that `update_average` moves toward π_θ.
    `shard(model)`, when given, shards a model in place across the processes (accelerate's FSDP2 preparation); it
    is applied to π_θ and to every frozen copy before the optimizers exist; `empty`: the models are built with
    empty weights, which sharding fills (FSDP2 memory-efficient loading, on a process other than the first)."""

    def __init__(
        self,
        cfg,
        device,
        keep_initial: bool = False,
        averages: tuple[str, ...] = (),
        shard=None,
        empty: bool = False,
        model=None,
    ):
        self.cfg, self.device, self.shard, self.empty = cfg, device, shard, empty
        n, k = cfg.ensemble_size, cfg.steps // cfg.phases
        model = load_policy(cfg, model, empty, device)  # with LoRA: the "default" adapter; `model`: an in-memory one
        self.names: list[str | None] = [None]
        self.aux_adapters: list[str] = []  # LoRA adapters besides the trained ones: behavior (π_β), ema, merged
        self.behavior_model = self.initial_model = None
        self.average_models: dict[str, torch.nn.Module] = {}  # full fine-tuning: name -> frozen copy
        if cfg.lora:
            self.names = ["default"] + [f"e{i}" for i in range(1, n)]
            for i, name in enumerate(self.names[1:], 1):
                torch.manual_seed(cfg.seed + i)
                model.add_adapter(name, copy.deepcopy(model.peft_config["default"]))
            shape = dict(r=cfg.lora_r * n, lora_alpha=cfg.lora_alpha * n) if cfg.ensemble_merge == "exact" else {}
            merged_cfg = dataclasses.replace(copy.deepcopy(model.peft_config["default"]), **shape)
            needed = [("behavior", n > 1 or k > 1), *((a, True) for a in averages), ("merged", n > 1)]
            self.aux_adapters = [a for a, need in needed if need]
            for name in self.aux_adapters:
                model.add_adapter(name, copy.deepcopy(merged_cfg))
            if cfg.disable_dropout:
                disable_dropout(model)
        self.model = to_device(model, device)  # empty (meta) weights stay so until they are sharded
        if not cfg.lora:
            if k > 1:
                self.behavior_model = _snapshot(model)
            if keep_initial:
                self.initial_model = _snapshot(model)
            self.average_models = {a: _snapshot(model) for a in averages}
        if shard is not None:
            self.model = shard(self.model)
            self.behavior_model, self.initial_model = (
                m if m is None else shard(m) for m in (self.behavior_model, self.initial_model)
            )
            self.average_models = {a: shard(m) for a, m in self.average_models.items()}
        self.sharded = is_sharded(self.model.parameters())
        self.params = [self._params_of(name) for name in self.names]
        self.optimizers, self.schedulers = [], []
        for name in self.names:
            self._activate(name)
            opt, sched = make_optimizer(self.model, cfg, cfg.steps)
            self.optimizers.append(opt)
            self.schedulers.append(sched)
        self._activate(self.names[0])
        if cfg.lora:
            for a in averages:
                self._merge_into(a)

    # ------------------------------------------------------------------------------------------ adapters

    def _params_of(self, name: str | None) -> list[torch.nn.Parameter]:
        if name is None:
            return list(self.model.parameters())
        return [p for n, p in self.model.named_parameters() if f".{name}." in n]

    def _activate(self, name: str | None, trainable: bool = True) -> None:
        if name is not None:
            self.model.set_adapter(name, inference_mode=not trainable)

    def lora_layers(self):
        return [m for m in self.model.modules() if hasattr(m, "lora_A") and self.names[0] in getattr(m, "lora_A", {})]

    @torch.no_grad()
    def merged_factors(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the merged ensemble in one LoRA layer (see the module docstring), as whole tensors (gathered
        when sharded: a collective)."""
        a = [full_tensor(module.lora_A[n].weight) for n in self.names]
        b = [full_tensor(module.lora_B[n].weight) for n in self.names]
        if self.cfg.ensemble_merge == "exact":
            return torch.cat(a, dim=0), torch.cat(b, dim=1) / len(b)
        return torch.stack(a).mean(dim=0), torch.stack(b).sum(dim=0)

    @torch.no_grad()
    def _merge_into(self, target: str, rate: float = 1.0) -> None:
        """target ← (1 − rate)·target + rate·merged ensemble, factor by factor (rate 1 = a copy); a DoRA adapter's
        magnitudes likewise (DoRA is one adapter: no ensemble)."""
        for module in self.lora_layers():
            a, b = self.merged_factors(module)
            pairs = [(module.lora_A[target].weight, a), (module.lora_B[target].weight, b)]
            magnitudes = getattr(module, "lora_magnitude_vector", None)
            if magnitudes is not None and self.names[0] in magnitudes:
                pairs.append((magnitudes[target].weight, full_tensor(magnitudes[self.names[0]].weight)))
            for factor, value in pairs:
                factor.lerp_(shard_like(value, factor), rate)

    # ------------------------------------------------------------------------------------------ the models

    def refresh_behavior(self) -> None:
        """π_β ← π_θ (the merged ensemble). Called at every phase start."""
        if self.cfg.lora and "behavior" in self.aux_adapters:
            self._merge_into("behavior")
        elif self.behavior_model is not None:
            with torch.no_grad():  # parameter by parameter: shard by shard when sharded
                for b, p in zip(self.behavior_model.parameters(), self.model.parameters(), strict=True):
                    b.copy_(p)

    @contextlib.contextmanager
    def _evaluating(self, adapter: str | None = None, adapter_off: bool = False, model=None):
        """Context yielding a model to run in eval mode without gradients: a separate one, the base (adapters
        off), or an adapter."""
        target = model if model is not None else self.model
        try:
            if adapter is not None:
                self._activate(adapter, trainable=False)
            with eval_mode(target, adapter_off):
                yield target
        finally:
            reshard(target)  # sharded: parameter-wise ops after this see the shards
            if adapter is not None:
                self._activate(self.names[0])

    def behavior(self):
        """Context yielding π_β (for sampling and its log-probs)."""
        if self.cfg.lora and "behavior" in self.aux_adapters:
            return self._evaluating(adapter="behavior")
        return self._evaluating(model=self.behavior_model)

    def merged(self):
        """Context yielding the merged ensemble (what is evaluated and exported)."""
        if "merged" in self.aux_adapters:
            self._merge_into("merged")
            return self._evaluating(adapter="merged")
        return self._evaluating(adapter=self.names[0])

    def initial(self):
        """Context yielding π_sft, the policy before training (the base with adapters off, or a frozen copy)."""
        return self._evaluating(adapter_off=True) if self.cfg.lora else self._evaluating(model=self.initial_model)

    def average(self, name: str):
        """Context yielding the moving average `name` of π_θ (an adapter with LoRA, a frozen copy otherwise)."""
        return self._evaluating(adapter=name) if self.cfg.lora else self._evaluating(model=self.average_models[name])

    @torch.no_grad()
    def update_average(self, name: str, rate: float) -> None:
        """average ← (1 − rate)·average + rate·π_θ (the merged ensemble with LoRA)."""
        if self.cfg.lora:
            self._merge_into(name, rate)
        else:
            for e, p in zip(self.average_models[name].parameters(), self.model.parameters()):
                e.lerp_(p, rate)

    # ------------------------------------------------------------------------------------------ training

    def step(
        self,
        batch,
        ref: torch.Tensor,
        n_global: int,
        n_keys: int = 2,
        step: int | None = None,
        n_local: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], float, float]:
        """One optimizer step of every adapter on the same pairs; returns per-pair stats (mean over adapters),
        the mean gradient norm and the learning rate.

        Each process holds n_local of the n_global usable pairs; the loss is Σ(local pair losses) / n_global
        and gradients are summed over processes, so any split of the pairs gives the same update. A batch with
        `n_local` = 0 (a sharded process without pairs of its own) is run with weight 0: the forward and backward
        calls are collectives then."""
        rows = batch["input_ids"].size(0) // n_keys
        n_local = rows if n_local is None else n_local
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        # FSDP2 averages the gradient over processes; the update wants their sum (as the all-reduce below)
        scale = torch.distributed.get_world_size() if self.sharded else 1
        all_stats, norms = [], []
        for name, params, opt, sched in zip(self.names, self.params, self.optimizers, self.schedulers):
            self._activate(name)
            self.model.train()
            if rows:
                sums, counts, logit_sums = sequence_logps(
                    self.model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["completion_mask"],
                    n_keys,
                    logit_means=True,
                )
                loss, stats = objective(sums, counts, ref, n_keys, **objective_options(self.cfg))
                stats.update(pair_logit_means(logit_sums, counts, n_keys))
                (loss * (n_local / n_global * scale)).backward()
                if n_local:
                    all_stats.append(stats)
            if distributed and not self.sharded:
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
                torch.distributed.all_reduce(flat)
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad = g.view_as(p)
            norms.append(
                float(full_tensor(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm or float("inf"))))
            )
            check_finite_step(norms[-1], step)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        self._activate(self.names[0])
        merged = {k: torch.stack([s[k] for s in all_stats]).mean(dim=0) for k in all_stats[0]} if all_stats else {}
        return merged, sum(norms) / len(norms), self.schedulers[0].get_last_lr()[0]

    def skip_step(self) -> None:
        """A step without usable pairs still advances every schedule (the budget was spent)."""
        with warnings.catch_warnings():  # torch warns about a scheduler step without an optimizer step
            warnings.simplefilter("ignore", UserWarning)
            for sched in self.schedulers:
                sched.step()

    def learning_rate(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    # ------------------------------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a resumed run needs (all adapters, or the model and its frozen copies)."""
        if self.cfg.lora:
            return {n: p for n, p in self.model.named_parameters() if "lora_" in n}
        out = {f"policy.{n}": p for n, p in self.model.named_parameters()}
        for prefix, snapshot in (("behavior", self.behavior_model), *self.average_models.items()):
            if snapshot is not None:
                out.update({f"{prefix}.{n}": p for n, p in snapshot.named_parameters()})
        return out

    def optimizer_state(self) -> tuple[StateList, StateList]:
        return StateList(self.optimizers), StateList(self.schedulers)

    def final_state(self, keep: bool) -> dict[str, torch.Tensor] | None:
        """Every process calls this before `write_final`: merges the ensemble (with LoRA, n > 1) and, when the
        weights are sharded, gathers them whole (the adapters' tensors with LoRA), kept by `keep` only; None when
        they are not sharded (then `write_final` reads the model itself)."""
        if len(self.names) > 1:
            self._merge_into("merged")
        if not self.sharded:
            return None
        return whole_tensors(
            ((k, v) for k, v in self.model.state_dict().items() if not self.cfg.lora or "lora_" in k), keep=keep
        )

    def write_final(self, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the merged policy in Hugging Face format into `directory` (a PEFT adapter with LoRA), from
        `state` (`final_state`'s, when sharded) or the model."""
        given = {} if state is None else {"state_dict": state}
        if not self.cfg.lora:
            self.model.save_pretrained(directory, **given)
        elif len(self.names) == 1:
            self.model.save_pretrained(directory, selected_adapters=["default"], **given)
        else:
            self.model.save_pretrained(directory, selected_adapters=["merged"], **given)
            for f in (directory / "merged").iterdir():  # PEFT writes a non-default adapter into a subdirectory
                os.replace(f, directory / f.name)
            (directory / "merged").rmdir()
