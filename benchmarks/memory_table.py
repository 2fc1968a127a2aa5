"""Per-GPU memory of a preference-optimization step for a Llama-style model, computed from its config.

Run (from the repository root):

    .venv/bin/python benchmarks/memory_table.py                 # the table of docs/scaling.md (7B and 70B, 8 GPUs)
    flags: --gpus 8 --pairs 4 --seq 1024 --lora-r 16 --config path/to/config.json (any Llama-style config.json)
           --cpu-test (the prediction for the 1.08 GB model of tests/test_fsdp_loading.py)

What is counted, per GPU, for N GPUs with the weights sharded (FSDP2 or ZeRO-3), each GPU taking `pairs`
preference pairs of `seq` tokens per sequence (chosen and rejected: 2 sequences a pair; BAPO adds a third):

- weights: the parameters' shard (P/N) plus two layers gathered whole in bf16 (the one computing and the one
  prefetched). FSDP2 as tether ships it keeps float32 parameters and computes in bf16 (`torch_dtype: float32`,
  `mixed_precision: bf16`): 4 bytes a parameter; ZeRO-3 in bf16 keeps bf16 parameters (2 bytes) and a float32
  master copy, counted with the optimizer as in the ZeRO paper (Rajbhandari et al. 2020: 2 + 2 + 12 bytes).
- gradients: of the trained parameters, sharded: 4 bytes (FSDP2, float32) or 2 bytes (ZeRO-3, bf16).
- optimizer: AdamW's two moments in float32 (8 bytes), plus ZeRO-3's float32 master weights (4 bytes).
- LoRA: the base is frozen in bf16 (`torch_dtype: bfloat16`, 2 bytes, sharded); only the adapter (rank r on every
  linear layer but the output head) has gradients and optimizer state, as above.
- activations (bf16, not sharded: each GPU keeps its own micro-batch's): what autograd saves per token and decoder
  layer — the residual input, the two norm outputs, q, k, v, the attention output and its copy, the MLP's gate,
  up, activation and product: 7·h + 2·h_kv + 4·i values (h hidden, h_kv the key/value width, i the MLP width);
  flash / memory-efficient attention keeps no s × s scores (the CPU prediction adds them: a·s values a token). With
  gradient checkpointing only each layer's input is kept (h values a token and layer) plus one layer recomputed.
  Both add the output head's float32 logits and their gradient (2 × 4 × vocab bytes a token).
Not counted: the CUDA context and allocator slack (typically 1–3 GB a GPU), communication buffers, the
reference log-probs (precomputed: a few bytes a pair).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
# config.json of meta-llama/Llama-2-7b-hf and meta-llama/Llama-2-70b-hf (the fields the count needs)
LLAMA_2_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
) | dict(vocab_size=32000, tie_word_embeddings=False)
LLAMA_2_70B = dict(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
) | dict(vocab_size=32000, tie_word_embeddings=False)
# tests/test_fsdp_loading.py's random-init model (float32, the toy tokenizer's 400 tokens)
CPU_TEST = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16
) | dict(vocab_size=400, tie_word_embeddings=False)


@dataclass
class Shape:
    h: int  # hidden size
    i: int  # MLP width
    layers: int
    heads: int
    kv: int  # key/value width = head_dim · key/value heads
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: dict) -> Shape:
        h, heads = config["hidden_size"], config["num_attention_heads"]
        kv = h // heads * config.get("num_key_value_heads", heads)
        return cls(
            h, config["intermediate_size"], config["num_hidden_layers"], heads, kv, config["vocab_size"],
            config.get("tie_word_embeddings", False),
        )  # fmt: skip

    def layer_params(self) -> int:
        """One decoder layer: q, o (h × h), k, v (h × kv), gate, up, down (h × i), two RMSNorm weights."""
        return 2 * self.h * self.h + 2 * self.h * self.kv + 3 * self.h * self.i + 2 * self.h

    def params(self) -> int:
        """Every parameter: the layers, the embedding, the final norm and the output head (unless tied)."""
        head = 0 if self.tied else self.vocab * self.h
        return self.layers * self.layer_params() + self.vocab * self.h + self.h + head

    def lora_params(self, r: int) -> int:
        """A rank-r adapter on every linear layer of the decoder (r · (in + out) each)."""
        per_layer = 2 * r * (self.h + self.h) + 2 * r * (self.h + self.kv) + 3 * r * (self.h + self.i)
        return self.layers * per_layer

    def activation_values(self, checkpointing: bool, seq: int, scores: bool = False) -> int:
        """Values autograd keeps per token over the whole model (see the module docstring)."""
        layer = 7 * self.h + 2 * self.kv + 4 * self.i + (self.heads * seq if scores else 0)
        return self.layers * self.h + layer if checkpointing else self.layers * layer


def per_gpu(shape: Shape, gpus: int, lora_r: int | None, engine: str, tokens: int, seq: int) -> dict[str, float]:
    """Bytes per GPU by part (see the module docstring); `lora_r` None = full fine-tuning."""
    p = shape.params()
    gathered = 2 * shape.layer_params() * 2  # two layers whole in bf16
    if lora_r is None:
        trained = p
        weights = p * (4 if engine == "fsdp2" else 2) / gpus + gathered
    else:
        trained = shape.lora_params(lora_r)
        weights = (p * 2 + trained * 4) / gpus + gathered
    grads = trained * (4 if engine == "fsdp2" or lora_r is not None else 2) / gpus
    optimizer = trained * (8 if engine == "fsdp2" or lora_r is not None else 12) / gpus
    logits = tokens * shape.vocab * 8
    act = {ck: tokens * shape.activation_values(ck, seq) * 2 + logits for ck in (False, True)}
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "act": act[False], "act_ckpt": act[True]}


def table(gpus: int, pairs: int, seq: int, lora_r: int, models: dict[str, dict]) -> str:
    tokens = pairs * 2 * seq
    lines = [
        f"Per GPU, {gpus} GPUs, {pairs} pairs × 2 sequences × {seq} tokens per GPU and micro-batch, bf16 compute, "
        f"LoRA rank {lora_r} on every linear layer (computed by `benchmarks/memory_table.py`):",
        "",
        "| model | training | engine | weights | gradients | optimizer | activations | with checkpointing "
        "| total with checkpointing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, config in models.items():
        shape = Shape.of(config)
        for training, r in (("LoRA", lora_r), ("full", None)):
            for engine, label in (("fsdp2", "FSDP2"), ("zero3", "ZeRO-3")):
                m = per_gpu(shape, gpus, r, engine, tokens, seq)
                total = m["weights"] + m["gradients"] + m["optimizer"] + m["act_ckpt"]
                cells = [m[k] / GB for k in ("weights", "gradients", "optimizer", "act", "act_ckpt")] + [total / GB]
                lines.append(f"| {name} | {training} | {label} | " + " | ".join(f"{c:.1f} GB" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def cpu_test_prediction(processes: int = 2, lora_r: int = 4, tokens: int = 2 * 24) -> dict[str, float]:
    """Bytes one process of tests/test_fsdp_loading.py's memory run holds (float32 everywhere, no mixed
    precision, CPU attention keeps its scores): with memory-efficient loading its shard and the gathered layers;
    without it, also the whole model it loaded before sharding (held until the shards are made)."""
    shape = Shape.of(CPU_TEST)
    weights = shape.params() * 4
    adapter = shape.lora_params(lora_r) * (4 + 4 + 8) / processes
    gathered = 2 * shape.layer_params() * 4
    activations = tokens * shape.activation_values(False, 24, scores=True) * 4 + tokens * shape.vocab * 8
    shard = weights / processes + adapter + gathered + activations
    return {"weights": weights, "efficient": shard, "whole_first": shard + weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--config", type=Path, help="a Llama-style config.json instead of Llama 2 7B and 70B")
    ap.add_argument("--cpu-test", action="store_true", help="the prediction for tests/test_fsdp_loading.py")
    args = ap.parse_args()
    if args.cpu_test:
        print(json.dumps({k: round(v / GB, 3) for k, v in cpu_test_prediction().items()}))
        return
    models = {"Llama 2 7B": LLAMA_2_7B, "Llama 2 70B": LLAMA_2_70B}
    if args.config:
        models = {args.config.parent.name: json.loads(args.config.read_text())}
    print(table(args.gpus, args.pairs, args.seq, args.lora_r, models), end="")


if __name__ == "__main__":
    main()
