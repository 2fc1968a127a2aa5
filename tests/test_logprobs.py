"""Batched completion log-probs against a naive per-example loop."""

import torch

from tether.data import collate, load_preference_records, tokenize_records
from tether.logprobs import sequence_logps
from tether.models import add_lora, load_model


def naive_logps(model, prompt_ids, completion_ids):
    """One example at a time, no padding, full log-softmax over the vocabulary."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    per_token = logp.gather(-1, targets[:, None]).squeeze(-1)
    start = max(len(prompt_ids) - 1, 0)
    return per_token[start:].sum()


def _examples(tokenizer, data_dir, n=6):
    examples, _ = tokenize_records(load_preference_records(data_dir / "train.jsonl")[:n], tokenizer)
    return examples


def test_batched_equals_naive_loop(model_dir, data_dir, tokenizer):
    model = load_model(model_dir)
    examples = _examples(tokenizer, data_dir)
    batch = collate(examples, tokenizer.pad_token_id)
    sums, counts = sequence_logps(model, **batch)
    want = [naive_logps(model, ex.prompt_ids, ex.completion_ids[k]) for k in ("chosen", "rejected") for ex in examples]
    torch.testing.assert_close(sums, torch.stack(want), rtol=0, atol=2e-5)
    assert counts.tolist() == [len(ex.completion_ids[k]) for k in ("chosen", "rejected") for ex in examples]


def test_gradients_equal_naive_loop(model_dir, data_dir, tokenizer):
    model = load_model(model_dir)
    examples = _examples(tokenizer, data_dir, n=3)
    sums, _ = sequence_logps(model, **collate(examples, tokenizer.pad_token_id))
    sums.sum().backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.stack(
        [naive_logps(model, ex.prompt_ids, ex.completion_ids[k]) for k in ("chosen", "rejected") for ex in examples]
    ).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_padding_does_not_change_a_row(model_dir, data_dir, tokenizer):
    model = load_model(model_dir)
    examples = _examples(tokenizer, data_dir)
    alone, _ = sequence_logps(model, **collate(examples[:1], tokenizer.pad_token_id))
    together, _ = sequence_logps(model, **collate(examples, tokenizer.pad_token_id))
    torch.testing.assert_close(alone, together.view(2, -1)[:, 0], rtol=0, atol=2e-5)


def test_through_peft_wrapper_and_disabled_adapter(model_dir, data_dir, tokenizer):
    base = load_model(model_dir)
    batch = collate(_examples(tokenizer, data_dir), tokenizer.pad_token_id)
    want, _ = sequence_logps(base, **batch)
    peft = add_lora(load_model(model_dir), r=4, alpha=8, dropout=0.0, target_modules=None)
    with torch.no_grad():  # make the adapter non-trivial
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    changed, _ = sequence_logps(peft, **batch)
    assert not torch.allclose(changed, want)
    with peft.disable_adapter():
        off, _ = sequence_logps(peft, **batch)
    torch.testing.assert_close(off, want, rtol=0, atol=1e-5)


def test_shared_prompt_forward_equals_separate_rows(model_dir, tokenizer, tmp_path):
    """Each prompt once for its completions (3 groups, very different prompt lengths, a LoRA model):
    the same log-probs and gradients as one row per sequence."""
    from tether.data import Record

    recs = [
        Record("Hi\n", {"chosen": "a", "rejected": "b c d e f", "base": "g h"}, "r0"),
        Record(
            "What colour is the sky over the rose garden in the morning?\n",
            {"chosen": "The sky is blue.", "rejected": "blue", "base": "it is blue, thank you"},
            "r1",
        ),
        Record("Name it.\n", {"chosen": "apple", "rejected": "The apple is red, I believe.", "base": "x"}, "r2"),
    ]
    examples, _ = tokenize_records(recs, tokenizer)
    keys = ("chosen", "rejected", "base")
    batch = collate(examples, tokenizer.pad_token_id, keys)
    from tether.logprobs import _prompt_lengths

    assert _prompt_lengths(batch["completion_mask"], 3).tolist() == [len(ex.prompt_ids) for ex in examples]
    model = add_lora(load_model(model_dir), r=4, alpha=8, dropout=0.0, target_modules=None)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    separate, n1 = sequence_logps(model, **batch)
    separate.sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    shared, n3 = sequence_logps(model, **batch, n_keys=3)
    shared.sum().backward()
    torch.testing.assert_close(shared, separate, rtol=0, atol=2e-5)
    assert torch.equal(n1, n3)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-5, msg=n)
