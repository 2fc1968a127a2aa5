"""Padding-free batches (tether.packing): the same losses and gradients as padded batches (≤ 1e-5) on tiny Llama,
Qwen2-style and SmolLM2-shaped models, under sdpa and eager attention, LoRA and gradient checkpointing, and through
transformers' own position_ids packing; the rows they are packed into; and where tether pads instead."""

import pytest
import torch

from conftest import batch_of, jsonl_rows, loss_and_grads, max_deviation, mixed_examples, tiny, train_config
from tether.logprobs import _backbone_and_head, packed_logps, sequence_logps
from tether.models import add_lora, enable_gradient_checkpointing
from tether.packing import MAX_ROW, choose_rows, collated_layout, pack, pack_rows
from tether.train import train

TOLERANCE = 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "smollm2"])
@pytest.mark.parametrize("keys", [("chosen", "rejected"), ("chosen", "rejected", "base")], ids=["dpo", "bapo"])
def test_padding_free_loss_and_gradients_equal_padded(arch, attn, keys):
    model = tiny(arch, attn)
    batch = batch_of(mixed_examples(), keys)
    n = len(keys)
    ref = torch.randn(batch["input_ids"].size(0), generator=torch.Generator().manual_seed(3)) * 5 - 60
    padded = loss_and_grads(model, batch, n, ref)
    packed = loss_and_grads(model, batch, n, ref, padding_free=True)
    d_loss, d_grad = max_deviation(padded, packed)
    print(f"{arch} {attn} {n} keys: |Δ loss| {d_loss:.1e}, max |Δ grad| {d_grad:.1e}")
    assert d_loss <= TOLERANCE and d_grad <= TOLERANCE
    torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=5e-5)  # summed log-probs of ~-150


@pytest.mark.parametrize("arch", ["llama", "qwen2", "smollm2"])
def test_padding_free_under_lora_and_gradient_checkpointing(arch):
    """A LoRA adapter (PEFT, made non-trivial) with gradient checkpointing, in training mode: the padded path then
    runs whole sequences (no key/value cache), the padding-free one still shares each prompt."""
    model = add_lora(tiny(arch), r=4, alpha=8, dropout=0.0, target_modules=None)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    enable_gradient_checkpointing(model)
    model.train()
    batch = batch_of(mixed_examples(seed=4))
    ref = torch.full((batch["input_ids"].size(0),), -80.0)
    padded = loss_and_grads(model, batch, 3, ref)
    packed = loss_and_grads(model, batch, 3, ref, padding_free=True, chunk_size=16)
    d_loss, d_grad = max_deviation(padded, packed)
    print(f"{arch} LoRA + checkpointing: |Δ loss| {d_loss:.1e}, max |Δ grad| {d_grad:.1e}")
    assert all("lora_" in name for name in packed[2])
    assert d_loss <= TOLERANCE and d_grad <= TOLERANCE


@pytest.mark.parametrize("single_row", [False, True], ids=["rows", "one row"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_position_ids_packing_equals_padded(arch, single_row):
    """The packing flash attention (one row) and flex attention (rows) get: whole sequences, their boundaries read
    from position_ids by transformers' masking; run here through sdpa, which reads them the same way."""
    model = tiny(arch)
    batch = batch_of(mixed_examples(seed=6))
    want, counts = sequence_logps(model, **batch)
    split = _backbone_and_head(model)
    got, got_counts = packed_logps(*split, *batch.values(), 3, own_mask=False, single_row=single_row)
    torch.testing.assert_close(got, want, rtol=0, atol=5e-5)
    assert torch.equal(got_counts, counts)


def test_rows_are_bounded_and_hold_every_token_once():
    examples = mixed_examples(12, seed=8)
    batch = batch_of(examples)
    packed = pack(*batch.values(), n_keys=3, share_prompts=True, hidden_size=64)
    lengths = [len(e.prompt_ids) + sum(len(c) for c in e.completion_ids.values()) for e in examples]
    rows, width = packed.input_ids.shape
    assert width <= max(max(lengths), MAX_ROW) and rows * width < batch["input_ids"].numel()
    real = packed.group < len(examples)
    assert int(real.sum()) == sum(lengths)  # each prompt once, every completion token once, nothing else
    for r in range(rows):  # a group lies in one row, in one piece, starting at position 0
        for g in packed.group[r][real[r]].unique().tolist():
            cols = (packed.group[r] == g).nonzero().squeeze(1)
            assert cols.tolist() == list(range(int(cols[0]), int(cols[-1]) + 1))
            assert int(packed.position_ids[r, cols[0]]) == 0
    assert packed.labels.numel() == int(batch["completion_mask"].sum())


def test_first_fit_decreasing_and_the_chosen_width():
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert pack_rows([7, 7], 7) == [[0], [1]]
    width, rows = choose_rows([30] * 8, hidden_size=64)
    assert width >= 30 and sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(30 for _ in row) <= width for row in rows)
    width, rows = choose_rows([900, 10], hidden_size=64)
    assert (width, rows) == (900, [[0], [1]])  # a group longer than MAX_ROW: rows of its length


def test_pads_where_packing_cannot_apply(caplog):
    """Sliding-window layers (tether's mask would ignore the window), a layout that is not collate's: the padded
    computation, bit for bit, and a note in the log."""
    batch = batch_of(mixed_examples(seed=9))
    sliding = tiny("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    want, _ = sequence_logps(sliding, **batch, n_keys=3)
    with caplog.at_level("INFO", logger="tether"):
        got, _ = sequence_logps(sliding, **batch, n_keys=3, padding_free=True)
    assert torch.equal(got, want) and "padding_free" in caplog.text
    model = tiny("llama")
    left = {k: v.flip(1) for k, v in batch.items()}  # left padding
    assert collated_layout(left["attention_mask"], left["completion_mask"]) is None
    assert torch.equal(sequence_logps(model, **left, padding_free=True)[0], sequence_logps(model, **left)[0])


def test_training_runs_agree_padded_and_padding_free(model_dir, data_dir, tmp_path):
    """`tether train` both ways (LoRA, precomputed reference, held-out evaluation): the same metrics at every step
    within 1e-5, exactly log 2 at step 1 both ways, and reference caches of their own."""
    runs = {}
    for free in (False, True):
        cfg = train_config(
            model_dir,
            data_dir,
            tmp_path / f"free{free}",
            padding_free=free,
            lora=True,
            lora_r=4,
            eval_file=str(data_dir / "eval.jsonl"),
            ref_cache_dir=str(tmp_path / "cache"),
            write_report=False,
        )
        runs[free] = jsonl_rows(train(cfg) / "metrics.jsonl")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4  # train and eval tables, each way
    for padded, packed in zip(runs[False], runs[True], strict=True):
        for key in ("loss", "reward_margin", "logps_chosen", "logps_rejected", "grad_norm"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-5), key
    assert runs[False][0]["loss"] == runs[True][0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)
    assert runs[True][0]["reward_accuracy"] == 0.0  # policy == reference at step 1, bit for bit
