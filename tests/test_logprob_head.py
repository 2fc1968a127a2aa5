"""The chunked log-prob head (tether.logprob_head): the log-probs and gradients of the whole-head computation
(≤ 1e-6), for a plain head (full fine-tuning and frozen), a PEFT-wrapped one and a whole DPO step; nothing of
(positions × vocabulary) size kept for the backward pass; and the mean logits (TRL's logits/* metrics) equal to the
logits' mean (≤ 1e-5) on every path, without changing the log-probs, the loss or a gradient by one bit."""

import pytest
import torch
from torch import nn

from conftest import batch_of, loss_and_grads, max_deviation, mixed_examples, objective_defaults, tiny
from tether.logprob_head import gather_logps, head_logps, mean_logits
from tether.logprobs import pair_logit_means, sequence_logps
from tether.losses import objective
from tether.models import add_lora

TOLERANCE = 1e-6  # log-probs and losses
# gradients: the chunked backward computes W[y] − E_p[W] directly, autograd goes through the softmax; the two agree to
# the float32 rounding of sums over the vocabulary, which differs by CPU (1.2e-6 seen on an AVX-512/AMX machine)
GRAD_TOLERANCE = 5e-6


def _head_and_inputs(trainable: bool, t: int = 50, h: int = 16, v: int = 300):
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(h, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g) / h**0.5)  # logits of unit scale
    head.weight.requires_grad_(trainable)
    hidden = torch.randn(t, h, generator=g, requires_grad=True)
    return head, hidden, torch.randint(0, v, (t,), generator=g)


def _values_and_grads(head, hidden, labels, chunk):
    hidden.grad = head.weight.grad = None
    out = head_logps(head, hidden, labels, chunk)
    (out * torch.linspace(-1, 2, out.numel())).sum().backward()  # a different weight per position
    grads = [hidden.grad.clone()] + ([head.weight.grad.clone()] if head.weight.requires_grad else [])
    return out.detach(), grads


@pytest.mark.parametrize("trainable", [True, False], ids=["trained head", "frozen head"])
@pytest.mark.parametrize("chunk", [1, 7, 49])
def test_chunks_give_the_whole_head_values_and_gradients(trainable, chunk):
    head, hidden, labels = _head_and_inputs(trainable)
    want, want_grads = _values_and_grads(head, hidden, labels, 0)
    got, got_grads = _values_and_grads(head, hidden, labels, chunk)
    worst = max((a - b).abs().max().item() for a, b in zip(got_grads, want_grads))
    print(
        f"chunk {chunk}, {'trained' if trainable else 'frozen'}: |Δ logp| {(got - want).abs().max():.1e}, {worst:.1e}"
    )
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE)
    assert len(got_grads) == len(want_grads) and worst <= GRAD_TOLERANCE


def test_no_more_positions_than_a_chunk_is_the_whole_head_bit_for_bit():
    head, hidden, labels = _head_and_inputs(True)
    assert torch.equal(head_logps(head, hidden, labels, 50), gather_logps(head(hidden), labels))
    assert torch.equal(head_logps(head, hidden, labels, 0), gather_logps(head(hidden), labels))


def test_a_wrapped_head_goes_through_checkpointed_chunks():
    """A LoRA adapter on the LM head itself: not a plain nn.Linear, so the chunks go through torch.utils.checkpoint."""
    model = add_lora(tiny("llama"), r=4, alpha=8, dropout=0.0, target_modules=["lm_head", "q_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    head = model.get_base_model().lm_head
    assert type(head) is not nn.Linear
    batch = batch_of(mixed_examples(seed=2), ("chosen", "rejected"))
    ref = torch.full((batch["input_ids"].size(0),), -60.0)
    whole, chunked = (loss_and_grads(model, batch, 2, ref, chunk_size=c) for c in (0, 5))
    d_loss, d_grad = max_deviation(whole, chunked)
    assert any("lm_head.lora" in name for name in chunked[2]) and d_loss <= TOLERANCE and d_grad <= GRAD_TOLERANCE


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_a_dpo_step_with_chunks_equals_the_whole_head(padding_free):
    """Full fine-tuning of a SmolLM2-shaped model (tied embeddings: the head's gradient joins the embedding's)."""
    model = tiny("smollm2")
    batch = batch_of(mixed_examples(seed=3), ("chosen", "rejected"))
    ref = torch.randn(batch["input_ids"].size(0), generator=torch.Generator().manual_seed(1)) - 70
    whole = loss_and_grads(model, batch, 2, ref, padding_free=padding_free)
    chunked = loss_and_grads(model, batch, 2, ref, padding_free=padding_free, chunk_size=8)
    d_loss, d_grad = max_deviation(whole, chunked)
    print(f"DPO step, {'padding-free' if padding_free else 'padded'}: |Δ loss| {d_loss:.1e}, max |Δ grad| {d_grad:.1e}")
    assert d_loss <= TOLERANCE and d_grad <= GRAD_TOLERANCE


@pytest.mark.parametrize("trainable", [True, False], ids=["trained head", "frozen head"])
def test_the_backward_keeps_nothing_of_positions_by_vocabulary_size(trainable):
    head, hidden, labels = _head_and_inputs(trainable, t=64, h=8, v=2000)
    params = {id(p) for p in head.parameters()}
    kept: list[int] = []

    def pack_hook(t):
        if id(t) not in params:
            kept.append(t.numel())
        return t

    for chunk, bound in ((0, None), (8, 64 * 2000 // 4)):
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            head_logps(head, hidden, labels, chunk).sum()
        if bound is None:
            assert max(kept) >= 64 * 2000  # the whole head keeps its logits
        else:
            assert sum(kept) < bound, kept  # hidden states, labels, log-normalisers, E_p[W]: no logits


def _logit_means_by_hand(model, batch) -> torch.Tensor:
    """Per row, the mean of the whole model's logits over the vocabulary and the completion positions."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["completion_mask"][:, 1:].float()
    return (logits.mean(-1) * target).sum(1) / target.sum(1)


@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_mean_logits_is_the_mean_of_the_head_logits(bias):
    head, hidden, _ = _head_and_inputs(False)
    if bias:
        head.bias = nn.Parameter(torch.randn(head.out_features))
    want = head(hidden).mean(-1)
    for chunk in (0, 7):
        got = mean_logits(head, hidden, chunk)
        assert not got.requires_grad and got.dtype == torch.float32
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-5)


def _step(model, batch, share: bool, scoring: dict):
    """(sequence_logps's outputs, the DPO loss, every gradient) of one pair batch, each prompt run once (`share`) or
    the whole sequences."""
    out = sequence_logps(model, **batch, n_keys=2 if share else 1, **scoring)
    ref = torch.randn(batch["input_ids"].size(0), generator=torch.Generator().manual_seed(1)) - 70
    loss, _ = objective(out[0], out[1], ref, 2, **objective_defaults("dap"))
    model.zero_grad()
    loss.backward()
    return [t.detach() for t in out], loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "scoring",
    [{}, {"chunk_size": 5}, {"padding_free": True}, {"padding_free": True, "chunk_size": 5}],
    ids=["padded", "chunked", "padding-free", "padding-free chunked"],
)
@pytest.mark.parametrize("share", [False, True], ids=["whole sequences", "shared prompts"])
@pytest.mark.parametrize("arch", ["llama", "smollm2"])
def test_logit_means_match_the_logits_and_change_nothing(arch, share, scoring):
    """TRL's logits/chosen of one sequence, from the hidden states the head path has; the log-probs, the loss and
    every gradient bit for bit those of the same call without it."""
    model = tiny(arch)
    batch = batch_of(mixed_examples(seed=5), ("chosen", "rejected"))
    (sums, counts, logit_sums), loss, grads = _step(model, batch, share, {**scoring, "logit_means": True})
    (want_sums, want_counts), want_loss, want_grads = _step(model, batch, share, scoring)
    torch.testing.assert_close(logit_sums / counts, _logit_means_by_hand(model, batch), rtol=0, atol=1e-5)
    pairs = pair_logit_means(logit_sums, counts, 2)
    assert torch.equal(pairs["logits_rejected"], (logit_sums / counts)[5:])
    assert torch.equal(sums, want_sums) and torch.equal(counts, want_counts) and torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys() and all(torch.equal(grads[k], want_grads[k]) for k in grads)


def test_logit_means_of_a_wrapped_head_and_of_a_model_without_a_head_split():
    """A LoRA adapter on the LM head (its logits computed, chunk by chunk) and a model whose config names a logit
    scaling (no backbone/head split: the whole model's logits)."""
    model = add_lora(tiny("llama"), r=4, alpha=8, dropout=0.0, target_modules=["lm_head"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    scaled = tiny("llama", logits_scaling=2.0)
    batch = batch_of(mixed_examples(seed=2), ("chosen", "rejected"))
    for m, chunk in ((model, 4), (model, 0), (scaled, 0)):
        sums, counts, logit_sums = sequence_logps(m, **batch, n_keys=2, chunk_size=chunk, logit_means=True)
        torch.testing.assert_close(logit_sums / counts, _logit_means_by_hand(m, batch), rtol=0, atol=1e-5)
