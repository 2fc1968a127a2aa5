"""One evaluation point of the BAPO study on SmolLM2-135M-Instruct: the 399-question knowledge probe and greedy
answers to 50 held-out prompts (48 new tokens), timed; the probe scored both ways — each question's options on one
shared prompt pass (today's `multiple_choice_correct`) and every (question, option) as its own sequence (the
scoring before protocol version 3) — with the per-question answers compared.

    .venv/bin/python benchmarks/bench_eval_point.py [--threads 2] [--questions 399] [--out FILE.json]

Target (BENCHMARKS.md): the whole point ≤ 30 s at 2 threads on the idle machine, the same right/wrong answers.
Time an otherwise idle machine only; the script prints the process's CPU seconds beside the wall time so a loaded
run is recognisable (CPU ≈ threads × wall when the cores were free).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--questions", type=int, default=399)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tether.evaluate import completion_logps, multiple_choice_correct
    from tether.generation import generate
    from tether.models import load_model, load_tokenizer
    from tether_lab.instructed import general_prompts
    from tether_lab.probes import knowledge_questions

    model, tok = load_model("smollm2-135m-instruct").eval(), load_tokenizer("smollm2-135m-instruct")
    questions = knowledge_questions()[: args.questions]
    multiple_choice_correct(model, tok, questions[:8])  # warm-up
    shared, t_shared, cpu_shared = _timed(lambda: multiple_choice_correct(model, tok, questions, batch_size=32))
    prompts = general_prompts("test")[:50]
    _, t_gen, cpu_gen = _timed(lambda: generate(model, tok, prompts, max_new_tokens=48, batch_size=16))

    def one_by_one():
        logps = completion_logps(
            model,
            tok,
            [q["prompt"] for q in questions for _ in q["options"]],
            [o for q in questions for o in q["options"]],
        )
        return [float(int(np.argmax(logps[4 * i : 4 * i + 4])) == q["answer"]) for i, q in enumerate(questions)]

    separate, t_sep, cpu_sep = _timed(one_by_one)
    result = {
        "threads": args.threads, "questions": len(questions),
        "probe_shared_prompt_s": t_shared, "probe_shared_prompt_cpu_s": cpu_shared,
        "probe_one_sequence_per_option_s": t_sep, "probe_one_sequence_per_option_cpu_s": cpu_sep,
        "answers_s": t_gen, "answers_cpu_s": cpu_gen, "point_s": round(t_shared + t_gen, 2),
        "same_answers": shared == separate, "accuracy": sum(shared) / len(shared),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
