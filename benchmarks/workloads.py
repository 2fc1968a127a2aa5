"""The preference-pair workloads of the benchmarks, and how much of each batch would be padding.

Run (from the repository root) to print the padding share of each workload, no training:

    .venv/bin/python benchmarks/workloads.py                                # SmolLM2's tokenizer (`make smollm2`)
    flags: --model NAME_OR_DIR --pairs 64 --batch 8 --workloads filler,knowledge,long-chosen --max_length 256
           --out PATH (default benchmarks/results/padding_share.json)

Workloads (standard or conversational TRL records, deterministic):
- filler: `bench_job.py`'s job until issue 29: a colour question with a filler context (prompt ≤ 64 tokens), chosen
  and rejected answers of 24–120 tokens each, drawn independently.
- knowledge: questions of the knowledge probe (`tether_lab.probes`, every k-th, so all categories) as chat prompts,
  the right option as the chosen answer and the next option as the rejected one: short prompts of mixed length,
  answers of a few tokens.
- long-chosen: a filler prompt of 16–63 tokens, a long chosen answer (150–190 tokens) and a short rejected one
  (8–24): the shape of typical preference data where the preferred answer is several times longer (fits
  max_length 256 untruncated).
- uniform: `bench_dpo_step.py`'s step data: prompt 64 tokens, each completion 63 + EOS (nothing to pad).

Padding share (`padding_report`): batches as tether forms them (`stream_indices`, seed 42), tokens as tether
tokenizes them. For each batch: `real` = every prompt once plus every completion token (what has to be computed);
`sequences` = prompt + completion per row (a prompt counted once per completion); and the tokens each layout runs
through the model: `trl_padded` = 2B rows × the longest prompt + completion (TRL's concatenated forward);
`tether_padded` = B prompts left-padded to the longest prompt + 2B completions right-padded to the longest
completion (tether's shared-prompt path, `padding_free: false`); `tether_packed` = rows × width of
`tether.packing.choose_rows` (`padding_free: true`). Padding share = the share of a layout's tokens that is padding
(1 − sequences / run for TRL's rows, which repeat each prompt by design; 1 − real / run for tether's); tokens run ÷
real = the work a layout does per token that has to be computed (padding and repeated prompts both count).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("filler", "knowledge", "long-chosen", "uniform")


def make_words(n: int = 1500) -> list[str]:
    from tether_lab.demo import COLOURS, OBJECTS

    rng, onset, vowel = (
        random.Random(0),
        "b c d f g h k l m n p r s t v w z br st pl gr".split(),
        "a e i o u ai ou".split(),
    )
    words = set(OBJECTS + COLOURS)
    while len(words) < n:
        words.add("".join(rng.choice(onset) + rng.choice(vowel) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def fill(rng, words, cost, head: str, budget: int) -> str:
    """`head` followed by random words while the token count stays <= budget (BPE counts add up per word)."""
    text, used = head, cost(head)
    while True:
        w = rng.choice(words)
        if used + cost(" " + w) > budget:
            return text
        text, used = text + " " + w, used + cost(" " + w)


def knowledge_pairs(n: int) -> list[dict]:
    """n questions of the knowledge probe as conversational pairs: the right option vs the next one."""
    from tether_lab.probes import load_knowledge_probe

    probe = load_knowledge_probe()
    rows = probe[:: max(1, len(probe) // n)][:n]  # spread over the categories
    return [
        {
            "prompt": [{"role": "user", "content": r["question"]}],
            "chosen": [{"role": "assistant", "content": r["options"][r["answer"]]}],
            "rejected": [{"role": "assistant", "content": r["options"][(r["answer"] + 1) % len(r["options"])]}],
        }
        for r in rows
    ]


def filler_pairs(workload: str, tokenizer, n: int, rng: random.Random | None = None) -> list[dict]:
    """n standard-format pairs of a filler workload (filler, long-chosen or uniform; see the module docstring),
    drawn from `rng` (default random.Random(1)) in the order the benchmarks always drew them."""
    from tether_lab.demo import COLOURS, OBJECTS

    words, rng, cache = make_words(), rng or random.Random(1), {}

    def cost(s: str) -> int:
        if s not in cache:
            cache[s] = len(tokenizer(s)["input_ids"])
        return cache[s]

    budgets = {  # prompt, chosen, rejected: token budgets, each drawn just before its text
        "filler": (lambda: 63, lambda: rng.randint(24, 120), lambda: rng.randint(24, 120)),
        "long-chosen": (lambda: rng.randint(16, 63), lambda: rng.randint(150, 190), lambda: rng.randint(8, 24)),
        "uniform": (lambda: 63, lambda: 63, lambda: 63),
    }[workload]
    records = []
    for _ in range(n):
        obj, col = rng.choice(OBJECTS), rng.choice(COLOURS)
        prompt = fill(rng, words, cost, f"What colour is the {obj}? Context:", budgets[0]()) + "\n"
        chosen = fill(rng, words, cost, f"The {obj} is {col}, I believe.", budgets[1]())
        rejected = fill(rng, words, cost, f"{col}, maybe.", budgets[2]())
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def workload_pairs(workload: str, tokenizer, n: int) -> list[dict]:
    if workload not in WORKLOADS:
        sys.exit(f"unknown workload {workload!r}; use one of {', '.join(WORKLOADS)}")
    return knowledge_pairs(n) if workload == "knowledge" else filler_pairs(workload, tokenizer, n)


def batch_tokens(batch, hidden_size: int, keys=("chosen", "rejected")) -> dict[str, int]:
    """The token counts of `padding_report` for one batch of tokenized examples."""
    from tether.packing import choose_rows

    prompts = [len(e.prompt_ids) for e in batch]
    comps = [len(e.completion_ids[k]) for k in keys for e in batch]
    seqs = [len(e.prompt_ids) + len(e.completion_ids[k]) for k in keys for e in batch]
    groups = [len(e.prompt_ids) + sum(len(e.completion_ids[k]) for k in keys) for e in batch]
    width, rows = choose_rows(groups, hidden_size)
    return {
        "real": sum(prompts) + sum(comps),
        "sequences": sum(seqs),
        "trl_padded": len(seqs) * max(seqs),
        "tether_padded": len(batch) * max(prompts) + len(comps) * max(comps),
        "tether_packed": len(rows) * width,
    }


def tether_batches(examples, batch_size: int, seed: int = 42) -> list[list]:
    """One epoch of `examples` in the batches tether's offline loop forms (`stream_indices`)."""
    from tether.train.optimization import stream_indices

    order = stream_indices(0, len(examples), len(examples), seed)
    return [[examples[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def padding_report(batches, hidden_size: int, keys=("chosen", "rejected")) -> dict:
    """Token counts summed over `batches` (lists of tokenized examples), and each layout's padding share."""
    totals: dict[str, int] = {}
    for batch in batches:
        for k, v in batch_tokens(batch, hidden_size, keys).items():
            totals[k] = totals.get(k, 0) + v
    layouts = ("trl_padded", "tether_padded", "tether_packed")
    content = {"trl_padded": totals["sequences"], "tether_padded": totals["real"], "tether_packed": totals["real"]}
    return {
        "tokens": totals,
        "padding_share": {k: 1 - content[k] / totals[k] for k in layouts},
        "tokens_over_real": {k: totals[k] / totals["real"] for k in layouts},
        "batches": len(batches),
    }


def tokenized(records: list[dict], tokenizer, max_length: int, max_prompt_length: int):
    from tether.data import parse_record, tokenize_records

    recs = [parse_record(r, f"record {i}") for i, r in enumerate(records)]
    return tokenize_records(recs, tokenizer, max_length, max_prompt_length)[0]


def print_report(name: str, report: dict) -> None:
    t, s, w = report["tokens"], report["padding_share"], report["tokens_over_real"]
    print(
        f"{name:<12} real {t['real']:6d} tokens ({t['sequences']} with each prompt per completion); padding share "
        f"(tokens run ÷ real): TRL padded {100 * s['trl_padded']:4.1f}% ({w['trl_padded']:.2f}x), tether padded "
        f"{100 * s['tether_padded']:4.1f}% ({w['tether_padded']:.2f}x), tether packed {100 * s['tether_packed']:4.1f}% "
        f"({w['tether_packed']:.2f}x)",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="its tokenizer and hidden size")
    p.add_argument("--workloads", default="filler,knowledge,long-chosen")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "padding_share.json"))
    args = p.parse_args()
    from transformers import AutoConfig

    from tether.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(args.model)
    hidden = AutoConfig.from_pretrained(resolve_model_path(args.model)).hidden_size
    reports = {}
    for w in args.workloads.split(","):
        ex = tokenized(workload_pairs(w, tok, args.pairs), tok, args.max_length, args.max_length // 2)
        reports[w] = padding_report(tether_batches(ex, args.batch), hidden)
        print_report(w, reports[w])
    settings = {k: getattr(args, k) for k in ("model", "pairs", "batch", "max_length")}
    Path(args.out).write_text(json.dumps({"settings": settings, "workloads": reports}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
