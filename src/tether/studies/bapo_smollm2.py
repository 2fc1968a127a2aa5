"""`tether study bapo --model smollm2-135m-instruct`: DPO vs BAPO with LoRA on a real instruction-tuned model.

Personalization data comes from the model itself (`tether.instructed`): for each training prompt (no
instruction), chosen = the model's answer WITH the persona's instruction, rejected = its answer without (both
sampled at temperature 0.7, top-k 50, seeded). BAPO's base responses y_b are the model's greedy answers.
Every run fine-tunes a fresh LoRA adapter with the same steps, batch and learning rate; then, on held-out
prompts and the shipped knowledge probe:

    knowledge            cloze multiple-choice accuracy on the 399-question probe; retained = fraction of the
                         questions the base model got right that the tuned model still gets right
    persona score        the persona's programmatic style score of greedy answers (no instruction in the prompt)
    win rate vs base     the tuned answer's persona score beats the base's answer's (ties half)
    KL from the base     Monte-Carlo KL(π_θ ‖ π_base) in nats per response, one sample per held-out prompt

Summary per (persona, method): mean and 95% percentile-bootstrap CI, over seeds when several ran, else over the
items (questions or prompts) of the one run. Claims (the BAPO paper's, on this model): (1) BAPO retains more
knowledge than DPO; (2) BAPO stays closer to the base (lower KL) than DPO; (3) BAPO's persona score is within
0.05 of DPO's. Each holds or not on the means, per persona, reported with the paired difference BAPO − DPO and
its CI (paired over items for one seed, over seeds otherwise), so a reader sees whether the gap is resolved.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..config import load_config
from ..evaluate import multiple_choice_correct, sampled_kl
from ..stats import summarize, win_rates
from ..files import write_text_atomic
from ..generation import generate
from ..instructed import general_prompts, get_instructed_persona, instructed_preference_records
from ..models import load_model, load_tokenizer
from ..probes import knowledge_questions
from ..train import TrainConfig, train
from .common import StudyResults, set_threads, summarize_runs

log = logging.getLogger("tether")
METHODS = {"dpo": 0.0, "bapo": None}  # anchor weight (None = the protocol's λ)
METRICS = ("knowledge", "knowledge_retained", "persona_score", "win_rate", "kl")


@dataclass
class LlmBapoProtocol:
    model: str = "smollm2-135m-instruct"
    personas: list[str] = field(default_factory=lambda: ["concise", "simple"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    train_prompts: int = 150
    eval_prompts: int = 50
    steps: int = 30
    batch_size: int = 8
    learning_rate: float = 2e-4
    beta: float = 0.1
    anchor_weight: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    max_new_tokens: int = 48
    data_temperature: float = 0.7


def protocol_for(model: str, quick: bool = False, seeds: list[int] | None = None) -> LlmBapoProtocol:
    """The CLI's protocols: two personas and one seed (≈ 35 minutes for SmolLM2 on 2 cores), or with `quick` the
    `simple` persona only (≈ 20 minutes); `seeds` replaces the seed list."""
    proto = LlmBapoProtocol(model=model, personas=["simple"]) if quick else LlmBapoProtocol(model=model)
    if seeds:
        proto.seeds = list(seeds)
    return proto


def _data_files(out: Path, protocol: LlmBapoProtocol) -> dict[str, Path]:
    return {p: out / "data" / f"{p}.jsonl" for p in protocol.personas}


def _data(out: Path, protocol: LlmBapoProtocol, model, tok) -> dict[str, Path]:
    """One preference file per persona under out/data (generated once; default answers shared)."""
    files = _data_files(out, protocol)
    if all(f.exists() for f in files.values()):
        return files
    prompts = general_prompts("train")[: protocol.train_prompts]
    kw = dict(max_new_tokens=protocol.max_new_tokens, do_sample=True, temperature=protocol.data_temperature, top_k=50,
              batch_size=16, progress=True)
    default = generate(model, tok, prompts, seed=1, **kw)
    for name, path in files.items():
        rows = instructed_preference_records(model, tok, get_instructed_persona(name), prompts, default=default, seed=2, **kw)
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return files


def _evaluate(model, base, tok, protocol, base_eval: dict | None) -> dict:
    prompts = general_prompts("test")[: protocol.eval_prompts]
    correct = multiple_choice_correct(model, tok, knowledge_questions(), batch_size=32)
    answers = generate(model, tok, prompts, max_new_tokens=protocol.max_new_tokens, batch_size=16)
    out = {"knowledge": sum(correct) / len(correct), "correct": correct, "answers": answers,
           "persona_scores": {p: [get_instructed_persona(p).score(a) for a in answers] for p in protocol.personas}}
    if base_eval is not None:
        out["kept"] = [float(c) for c, b in zip(correct, base_eval["correct"]) if b]
        out["knowledge_retained"] = sum(out["kept"]) / len(out["kept"])
        out["kls"] = sampled_kl(model, base, tok, prompts, max_new_tokens=protocol.max_new_tokens)
        out["kl"] = sum(out["kls"]) / len(out["kls"])
    return out


def run_study(quick: bool = True, out: str | Path = "out/study-bapo-smollm2", protocol: LlmBapoProtocol | None = None,
              threads: int | None = None) -> dict:
    set_threads(threads)
    protocol = protocol or protocol_for(LlmBapoProtocol.model, quick=quick)
    out = Path(out)
    t_start = time.perf_counter()
    results = StudyResults(out, "bapo-llm", asdict(protocol))
    base, tok = load_model(protocol.model).eval(), load_tokenizer(protocol.model)
    base_file = out / "base_eval.json"
    reused = {"training data": all(f.exists() for f in _data_files(out, protocol).values()),
              "base evaluation": base_file.exists()}
    files = _data(out, protocol, base, tok)
    if base_file.exists():
        base_eval = json.loads(base_file.read_text())
    else:
        t0 = time.perf_counter()
        base_eval = _evaluate(base, None, tok, protocol, None)
        base_eval["seconds"] = round(time.perf_counter() - t0, 1)
        write_text_atomic(base_file, json.dumps(base_eval))
    results.data["data"] = {p: _data_stats(f, p) for p, f in files.items()}

    settings = [(p, m, s) for p in protocol.personas for m in protocol.methods for s in protocol.seeds]
    for persona, method, seed in tqdm(settings, desc="study bapo (LLM)", unit="run"):
        if results.find(persona=persona, method=method, seed=seed):
            continue
        run_dir = out / "runs" / f"{persona}-{method}-s{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        weight = METHODS[method] if METHODS[method] is not None else protocol.anchor_weight
        cfg = load_config(TrainConfig, None, dict(
            model=protocol.model, train_file=str(files[persona]), output_dir=str(run_dir), method="bapo",
            anchor_weight=weight, beta=protocol.beta, learning_rate=protocol.learning_rate, max_steps=protocol.steps,
            batch_size=protocol.batch_size, seed=seed, lora=True, lora_r=protocol.lora_r, lora_alpha=protocol.lora_alpha,
            warmup_steps=0, save_steps=0, progress=False, write_report=False, eval_batch_size=16, base_max_new_tokens=protocol.max_new_tokens,
            max_length=256, max_prompt_length=96,
        ))
        t0 = time.perf_counter()
        train(cfg)
        t_train = time.perf_counter() - t0
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(load_model(protocol.model), run_dir / "final").eval()
        ev = _evaluate(tuned, base, tok, protocol, base_eval)
        shutil.rmtree(run_dir / "final")
        mine, theirs = ev["persona_scores"][persona], base_eval["persona_scores"][persona]
        wins = win_rates(mine, theirs)
        trace = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results.add({
            "persona": persona, "method": method, "seed": seed, "knowledge": ev["knowledge"],
            "knowledge_retained": ev["knowledge_retained"], "persona_score": sum(mine) / len(mine),
            "base_persona_score": sum(theirs) / len(theirs), "win_rate": sum(wins) / len(wins), "kl": ev["kl"],
            "items": {"knowledge": [float(c) for c in ev["correct"]], "knowledge_retained": ev["kept"],
                      "persona_score": mine, "win_rate": wins, "kl": ev["kls"]}, "train_seconds": round(t_train, 1), "seconds": round(time.perf_counter() - t0, 1),
            "sample": {"prompt": general_prompts("test")[0][0]["content"], "response": ev["answers"][0]},
            "trace": {k: [row.get(k) for row in trace] for k in ("step", "loss", "logps_chosen", "logps_rejected", "logps_base")},
        })

    runs = results.data["runs"]
    results.data["base"] = {"knowledge": base_eval["knowledge"], "seconds": base_eval.get("seconds"),
                            "persona_score": {p: sum(v) / len(v) for p, v in base_eval["persona_scores"].items()}}
    results.data["summary"] = summarize_runs(runs, ("persona", "method"), METRICS)
    results.data["claims"] = claims(results.data["summary"], protocol, runs)
    results.data["wall_seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
    results.data["reused_this_invocation"] = [k for k, v in reused.items() if v]
    results.save()
    figures(results.data, out)
    write_text_atomic(out / "report.md", report(results.data))
    return results.data


def _data_stats(path: Path, persona: str) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    chosen, rejected = [r["chosen_score"] for r in rows], [r["rejected_score"] for r in rows]
    return {"pairs": len(rows), "chosen_score": summarize(chosen)["mean"] if rows else None,
            "rejected_score": summarize(rejected)["mean"] if rows else None,
            "chosen_scores_higher": sum(c > r for c, r in zip(chosen, rejected)) / max(1, len(rows))}


def _mean(summary, persona, method, metric):
    row = next((r for r in summary if r["persona"] == persona and r["method"] == method), None)
    return row[metric]["mean"] if row and metric in row else None


def paired_difference(runs: list[dict], persona: str, metric: str) -> dict | None:
    """BAPO − DPO on `metric` for one persona: mean and bootstrap CI of per-item differences (questions or
    prompts are the same for both methods) when each ran one seed, else of per-seed differences."""
    by = {m: {r["seed"]: r for r in runs if r["persona"] == persona and r["method"] == m} for m in ("bapo", "dpo")}
    seeds = sorted(set(by["bapo"]) & set(by["dpo"]))
    if not seeds:
        return None
    if len(seeds) == 1 and all(metric in r.get("items", {}) for r in (by["bapo"][seeds[0]], by["dpo"][seeds[0]])):
        a, b = by["bapo"][seeds[0]]["items"][metric], by["dpo"][seeds[0]]["items"][metric]
        return {**summarize([x - y for x, y in zip(a, b, strict=True)]), "over": "items"}
    return {**summarize([by["bapo"][s][metric] - by["dpo"][s][metric] for s in seeds]), "over": "seeds"}


def claims(summary: list[dict], protocol: LlmBapoProtocol, runs: list[dict] = ()) -> list[dict]:
    out = []
    for p in protocol.personas:
        g = lambda m, k: _mean(summary, p, m, k)  # noqa: E731
        if None in (g("dpo", "knowledge_retained"), g("bapo", "knowledge_retained")):
            continue
        for metric, text, holds in (
            ("knowledge_retained", "BAPO retains more knowledge than DPO", lambda b, d: b > d),
            ("kl", "BAPO stays closer to the base (lower KL) than DPO", lambda b, d: b < d),
            ("persona_score", "BAPO's persona score is within 0.05 of DPO's", lambda b, d: b >= d - 0.05),
        ):
            out.append({"claim": f"{p}: {text}", "holds": holds(g("bapo", metric), g("dpo", metric)),
                        "numbers": {"bapo": g("bapo", metric), "dpo": g("dpo", metric)},
                        "difference": paired_difference(list(runs), p, metric)})
    return out


def figures(data: dict, out: Path) -> list[Path]:
    """tradeoff.png: persona score vs knowledge retained per (persona, method) with 95% CIs on both axes and the
    base's persona score; mechanism_logps.png: log π_θ of chosen, rejected and base answers during training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report_bapo import _save, mechanism_figure

    summary, personas = data["summary"], data["protocol"]["personas"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for row in summary:
        i, j = data["protocol"]["methods"].index(row["method"]), personas.index(row["persona"])
        x, y = row["knowledge_retained"], row["persona_score"]
        ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["ci95_low"]], [x["ci95_high"] - x["mean"]]],
                    yerr=[[y["mean"] - y["ci95_low"]], [y["ci95_high"] - y["mean"]]], color=f"C{i}", marker="os^D"[j % 4],
                    capsize=3, linestyle="none", label=f"{row['method']}, {row['persona']}")
    for j, p in enumerate(personas):
        ax.axhline(data["base"]["persona_score"][p], color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"base, {p}", (ax.get_xlim()[0], data["base"]["persona_score"][p]), fontsize=7, color="grey",
                    va="bottom")
    ax.set_xlabel("knowledge retained (of the questions the base got right)")
    ax.set_ylabel("persona score (held-out prompts)")
    over = "seeds" if len(data["protocol"]["seeds"]) > 1 else "items"
    ax.set_title(f"personalization vs retention (95% CI over {over})", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths = [_save(plt, fig, out / "tradeoff.png")]

    paths.append(mechanism_figure(plt, data, "persona", personas, str, "answer", out / "mechanism_logps.png"))
    return paths


def _cell(row, metric):
    s = row.get(metric)
    return "–" if s is None else f"{s['mean']:.3f} [{s['ci95_low']:.3f}, {s['ci95_high']:.3f}]"


def report(data: dict) -> str:
    pr, base = data["protocol"], data["base"]
    lines = [
        f"# BAPO on {pr['model']} (LoRA r {pr['lora_r']})", "",
        f"Protocol: personas {', '.join(pr['personas'])}; methods {', '.join(pr['methods'])}; seeds {pr['seeds']}; "
        f"{pr['steps']} steps × {pr['batch_size']} pairs, lr {pr['learning_rate']:g}, β {pr['beta']}, BAPO λ {pr['anchor_weight']}; "
        f"{pr['train_prompts']} training prompts, {pr['eval_prompts']} held-out prompts, the 399-question knowledge probe.", "",
        f"Base model: knowledge {base['knowledge']:.3f}; persona score " + ", ".join(f"{p} {v:.3f}" for p, v in base["persona_score"].items()) + ".", "",
        "Training data (the model's own answers with vs without the instruction):", "",
        "| persona | pairs | chosen score | rejected score | chosen scores higher |", "|---|---|---|---|---|",
    ]
    for p, d in data.get("data", {}).items():
        lines.append(f"| {p} | {d['pairs']} | {d['chosen_score']:.3f} | {d['rejected_score']:.3f} | {d['chosen_scores_higher']:.2f} |")
    over = "seeds" if len(pr["seeds"]) > 1 else "items (the 399 questions; the held-out prompts) of the one seed"
    lines += ["", f"Results: mean [95% bootstrap CI over {over}]", "",
              "| persona | method | knowledge | knowledge retained | persona score | win rate vs base | KL from base (nats) |",
              "|---|---|---|---|---|---|---|"]
    for row in data["summary"]:
        lines.append(f"| {row['persona']} | {row['method']} | " + " | ".join(_cell(row, m) for m in METRICS) + " |")
    lines += ["", "Every run:", "", "| persona | method | seed | knowledge | retained | persona | win | KL | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        lines.append(f"| {r['persona']} | {r['method']} | {r['seed']} | {r['knowledge']:.3f} | {r['knowledge_retained']:.3f} | "
                     f"{r['persona_score']:.3f} | {r['win_rate']:.3f} | {r['kl']:.2f} | {r['seconds']:.0f} |")
    lines += ["", "![personalization vs retention](tradeoff.png)", "",
              "![log-probs during training](mechanism_logps.png)", "", "Claims:", ""]
    for c in data["claims"]:
        nums = ", ".join(f"{k} {v:.3f}" for k, v in c["numbers"].items())
        if d := c.get("difference"):
            nums += f"; BAPO − DPO {d['mean']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}] over {d['over']}"
        lines.append(f"- {'HOLDS' if c['holds'] else 'does NOT hold'}: {c['claim']} ({nums})")
    if data.get("note"):
        lines += ["", f"Note: {data['note']}"]
    reused = data.get("reused_this_invocation")
    lines += ["", f"Wall time of the invocation that wrote this: {data.get('wall_seconds_this_invocation', 0) / 60:.1f} min"
              + (f" ({' and '.join(reused)} reused from an earlier invocation in the same directory)." if reused else "."), ""]
    return "\n".join(lines)
