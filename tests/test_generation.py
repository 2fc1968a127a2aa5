"""tether.generation.generate: batching and left padding change nothing; sampling is seeded; eos cuts."""

from __future__ import annotations

import pytest
import torch

from tether.generation import generate, generate_ids, prompt_ids
from tether_lab.tiny import tiny_llama, train_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog", "a b c d e f g", "hello there, general alignment"]


@pytest.fixture(scope="module")
def lm():
    tokenizer = train_tokenizer(TEXTS * 5, vocab_size=300)
    return tiny_llama(tokenizer, hidden_size=32, num_layers=2, seed=1).eval(), tokenizer


PROMPTS = [
    "the quick",
    [{"role": "user", "content": "a b c"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there, general alignment please"}],
    "x",
]


def test_batched_greedy_equals_one_by_one(lm):
    model, tok = lm
    together = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4)
    alone = [generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert together == alone and all(isinstance(t, str) for t in together)


def test_chat_prompts_use_the_template(lm):
    _, tok = lm
    ids = prompt_ids(tok, PROMPTS[1])
    assert ids[0] == tok.bos_token_id and tok.decode(ids).endswith("<|assistant|>")


def test_sampling_is_seeded_and_leaves_global_rng_alone(lm):
    model, tok = lm
    state = torch.random.get_rng_state()
    a = generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    b = generate(model, tok, PROMPTS, max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, seed=7)
    assert a == b


def test_output_is_cut_at_eos(lm):
    _, tok = lm
    model = tiny_llama(tok, hidden_size=32, num_layers=1, seed=2).eval()
    eos = torch.tensor([tok.eos_token_id])
    # the model predicts "a" first, then EOS forever: the completion is "a" and nothing after EOS leaks
    first = tok.convert_tokens_to_ids("a")
    calls = []

    def force(module, inputs, logits):
        token = torch.tensor([first]) if not calls else eos
        calls.append(1)
        return logits.index_fill(-1, token, 1e4)

    model.lm_head.register_forward_hook(force)
    assert generate(model, tok, ["x"], max_new_tokens=8) == ["a"]
    calls.clear()
    assert generate_ids(model, tok, [prompt_ids(tok, "x")], max_new_tokens=8) == [[first, tok.eos_token_id]]


def test_base_answers_are_generate_ids_per_prompt(lm):
    from tether.base_responses import base_answers

    model, tok = lm
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    greedy = base_answers(model, tok, ids, max_new_tokens=8, batch_size=2)
    assert greedy == [[y] for y in generate_ids(model, tok, ids, max_new_tokens=8)]
    sampled = base_answers(model, tok, ids, samples=3, seed=5, max_new_tokens=8, do_sample=True, top_k=20)
    assert [len(s) for s in sampled] == [3] * len(PROMPTS) and len({tuple(y) for s in sampled for y in s}) > len(
        PROMPTS
    )
    assert sampled == base_answers(model, tok, ids, samples=3, seed=5, max_new_tokens=8, do_sample=True, top_k=20)
