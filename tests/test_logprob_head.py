"""The chunked log-prob head (tether.logprob_head): the log-probs and gradients of the whole-head computation
(≤ 1e-6), for a plain head (full fine-tuning and frozen), a PEFT-wrapped one and a whole DPO step; and nothing of
(positions × vocabulary) size kept for the backward pass."""

import pytest
import torch
from torch import nn

from conftest import batch_of, loss_and_grads, max_deviation, mixed_examples, tiny
from tether.logprob_head import gather_logps, head_logps
from tether.models import add_lora

TOLERANCE = 1e-6


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
    assert len(got_grads) == len(want_grads) and worst <= TOLERANCE


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
    assert any("lm_head.lora" in name for name in chunked[2]) and d_loss <= TOLERANCE and d_grad <= TOLERANCE


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
    assert d_loss <= TOLERANCE and d_grad <= TOLERANCE


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
