"""docs/losses.md and the loss table of docs/methods.md §2, generated from `tether.loss_table`:
`python -m tether.loss_docs > docs/losses.md` (tests/test_losses.py checks both pages are current)."""

from __future__ import annotations

from .loss_table import LOSSES, Loss, reference_free_names


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bar inside a table cell (π(y|x)) would end the cell


def _params_text(entry: Loss) -> str:
    return "; ".join(
        f"`{p.name}` {'required' if p.default is None else f'{p.default:g}'} ({p.range_text()})" for p in entry.params
    )


def methods_table() -> str:
    """docs/methods.md §2's table: each loss's formula in tether's notation, its source and its function."""
    rows = ["| `loss` | per-pair loss | source | function |", "|---|---|---|---|"]
    for e in LOSSES.values():
        rows.append(f"| `{e.name}` | {_cell(e.formula)} | {_cell(e.source)} | `tether.losses.{e.function}` |")
    return "\n".join(rows) + "\n"


_HEAD = """# Losses

Every loss tether trains with, from its one table (`tether.loss_table`; this page is generated from it by
`python -m tether.loss_docs > docs/losses.md`, and `tests/test_losses.py` checks that it is current). The
formulas are in tether's notation (docs/methods.md §1: h the log-ratio margin, h̄ the same of mean
log-probs, ℓ = log π_θ − log π_ref of one response, r = β·ℓ its implicit reward).

    loss: dpo                                   one loss
    loss: dpo+bco_pair+sft                      a mixture Σ_k w_k·L_k (TRL's list of loss_type)
    loss_weights: [0.8, 0.2, 1.0]               its weights (default 1 each); this one is MPO

A TRL config's `loss_type` (one name or a list) and `loss_weights` are read as these. `beta` null (the default)
is the loss's own default. An option of a loss that the chosen loss does not read is an error, as is a
mixture whose losses have different default β without `beta` set. BAPO's anchor (`method: bapo`) adds to any
of them. `tether eval --model M --eval_file PAIRS --losses all` reports every loss's value on a file.

| `loss` | reference | length-normalized | parameters (default, range) | TRL 1.16 |
|---|---|---|---|---|
"""


def losses_page() -> str:
    """docs/losses.md, generated from the table (`python -m tether.loss_docs > docs/losses.md`)."""
    head = _HEAD
    rows = []
    for e in LOSSES.values():
        trl = f"`{e.trl}`" if e.trl else "—"
        where = trl if e.trl_trainer == "DPOTrainer" else f"{e.trl_trainer} (experimental) {trl if e.trl else ''}"
        rows.append(
            f"| `{e.name}` | {'yes' if e.reference else '**no**'} | {'yes' if e.normalized else 'no'} | "
            f"{_params_text(e)} | {where.strip()} |"
        )
    batch = "\n".join(f"- `{e.name}`: {e.batch}." for e in LOSSES.values() if e.batch)
    free = ", ".join(f"`{n}`" for n in reference_free_names())
    groups: dict[tuple, list[str]] = {}
    for e in LOSSES.values():
        groups.setdefault(e.metrics, []).append(f"`{e.name}`")
    metrics = "\n".join(f"- {', '.join(names)}: {', '.join(f'`{m}`' for m in m_)}." for m_, names in groups.items())
    return (
        head
        + "\n".join(rows)
        + f"""

## Formulas and sources

{methods_table()}
## Losses that are not a mean over pairs

{batch}

The batch of these is the micro-batch of one process, as in TRL: a step of P processes × `batch_size` b equals
one process with batch b and `gradient_accumulation_steps` P (the same micro-batches), not one process with
batch P·b. Every other loss is a mean over pairs, and there P × b equals 1 × P·b up to float summation order.
`tether eval --eval_file` takes the whole file as one batch.

## No reference

A loss whose every part reads no reference ({free}) trains without one: `tether train` loads no reference model
and runs no reference pass; with `method: bapo` only the base responses' reference log-probs are computed, once,
before training (the anchor needs log π_ref(y_b|x)). `ref_model` is then an error. `tether online` needs
`reference: none` for such a loss, and refuses it with any other reference (the point of BPO, π_ref = π_β, is
the reference). The rewards reported without a reference are r = β·log π_θ (of mean log-probs for a
length-normalizing loss), as TRL's CPO and ORPO trainers report them. The NLL terms of `cpo`, `orpo` and
`nll_weight` are the per-pair mean token NLL averaged over pairs (TRL's experimental trainers take one token
mean over the batch); `sft` is TRL's token mean over the batch.

## Metrics TRL logs for each

{metrics}

tether logs `reward_accuracy`, `reward_margin`, `rewards_chosen`, `rewards_rejected`, `logps_chosen`,
`logps_rejected`, `logits_chosen`, `logits_rejected` (and `nll`, `log_odds_ratio`, `log_odds_chosen` where the
loss has them) in metrics.jsonl, and under TRL's names above in TensorBoard / W&B. `logits_chosen` is, per pair,
the mean logit of the chosen response over its completion tokens and the vocabulary, averaged over the pairs of
the logged steps (every process) like the other statistics; TRL's `logits/chosen` pools the completion tokens of
each micro-batch (over processes) and averages those micro-batch means, so a long response weighs more in TRL's.
The two agree when the responses have equal lengths. tether computes it from the hidden states as h·mean_v(W)
(+ the bias's mean), without building a linear head's logits. `entropy`, `mean_token_accuracy` and `num_tokens`
are not logged (tether's head computes the logits of the completion positions only, `logprob_chunk_size` positions
at a time, each chunk's dropped before the next; with 0, all at once).

## Exactness against TRL

`tests/test_trl_losses.py` runs TRL 1.16's own `DPOTrainer` loss code on the same token log-probs as tether,
for each of the fifteen loss types, MPO and a mixture of fourteen (β 0.1 and 0.5, three draws each): loss,
gradient per token log-prob and the shared metrics agree within 1e-6 (relative, for losses above 1);
`python tests/test_trl_losses.py` prints the largest deviation per loss. SimPO, CPO and ORPO are checked
against hand-computed values of their papers' formulas (tests/test_losses.py) and against TRL's experimental
CPO and ORPO trainers.
"""
    )


if __name__ == "__main__":
    print(losses_page(), end="")
