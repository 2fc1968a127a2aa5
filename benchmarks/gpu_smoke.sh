#!/usr/bin/env bash
# GPU smoke test: what the CPU machine tether is developed on cannot run. A few minutes on one GPU.
#
#   benchmarks/gpu_smoke.sh [PYTHON]        (default .venv/bin/python; run from the repository root)
#
# Checks, each printed as ok / FAILED / skipped with its step time (metrics.jsonl's elapsed_s):
#   1. bf16 LoRA DPO           torch_dtype: bfloat16, lora: true
#   2. full DPO, mixed bf16    float32 weights, mixed_precision: bf16 (autocast)
#   3. gradient checkpointing  the LoRA run of 1 with gradient_checkpointing: true
#   4. FSDP2 on every GPU      examples/accelerate/fsdp.yaml (memory-efficient loading), full fine-tuning with a
#                              sharded checkpoint, killed and resumed: the engine results.json records, final/
#                              (needs 2 GPUs or more)
#   5. tether online           BPO with tether's own sampler; with --sampler vllm too when a vLLM environment is
#                              there ($VLLM_PYTHON, default .venv-vllm/bin/python: `make vllm`)
# The model is a random-init Llama of 200M parameters with a tokenizer trained on the toy task (tether_lab.demo):
# nothing is downloaded. Work files go to a temporary directory, removed at the end (kept on a failure).
# GPU_SMOKE_TINY=1 runs the same checks on a CPU with a tiny model: a test of this script, not of a GPU.
set -u
PY=${1:-.venv/bin/python}
HIDDEN=1024 LAYERS=16
if [ "${GPU_SMOKE_TINY:-0}" = 1 ]; then
    HIDDEN=32 LAYERS=2
    GPUS=0
    echo "gpu_smoke: GPU_SMOKE_TINY=1, the checks on a tiny model on this machine (a test of the script)"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_smoke: needs a CUDA GPU (torch.cuda.is_available() is False with $PY); nothing was run"
    exit 2
else
    GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    echo "gpu_smoke: $GPUS GPU(s): $("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")"
fi
WORK=$(mktemp -d -t tether-gpu-smoke-XXXX)
echo "gpu_smoke: work in $WORK"

"$PY" - "$WORK" "$HIDDEN" "$LAYERS" <<'EOF'
import sys
from pathlib import Path
from tether_lab.demo import toy_model, toy_preferences, write_jsonl
work, hidden, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
toy_model(work / "model", hidden_size=hidden, num_layers=layers, vocab_size=512)
write_jsonl(toy_preferences(512, seed=1), work / "train.jsonl")
write_jsonl([{"prompt": r["prompt"], "reference": r["chosen"]} for r in toy_preferences(256, seed=5)], work / "prompts.jsonl")
(work / "smoke_oracle.py").write_text("def shorter(prompts, responses):\n    return [-float(len(r)) for r in responses]\n")
EOF
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"  # the online checks' oracle: callable:smoke_oracle:shorter

TRAIN=(train --model "$WORK/model" --train_file "$WORK/train.jsonl" --max_steps 20 --batch_size 8 --max_length 256
       --learning_rate 1e-5 --save_steps 0 --progress false --write_report false)
ONLINE=(online --model "$WORK/model" --prompt_file "$WORK/prompts.jsonl" --oracle callable:smoke_oracle:shorter
        --steps 8 --phases 2 --prompts_per_step 16 --max_new_tokens 32 --lora true --torch_dtype bfloat16
        --save_steps 0 --progress false --write_report false)
FAILED=0
RESULTS=()

step_time() {  # median seconds per step from a run's metrics.jsonl
    "$PY" -c "
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1] + '/metrics.jsonl')]
t = [b['elapsed_s'] - a['elapsed_s'] for a, b in zip(rows, rows[1:])]
print(f'{statistics.median(t):.3f} s/step over {len(rows)} steps' if t else 'one step')" "$1" 2>/dev/null || echo "-"
}

check() {  # check NAME RUN_DIR command...
    local name=$1 run=$2
    shift 2
    if "$@" --output_dir "$run" >"$run.log" 2>&1; then
        RESULTS+=("ok       $name: $(step_time "$run")")
    else
        RESULTS+=("FAILED   $name: see $run.log")
        FAILED=1
    fi
    echo "${RESULTS[-1]}"
}

check "bf16 LoRA DPO" "$WORK/lora" "$PY" -m tether.cli "${TRAIN[@]}" --lora true --torch_dtype bfloat16
check "full DPO, mixed bf16" "$WORK/full" "$PY" -m tether.cli "${TRAIN[@]}" --mixed_precision bf16
check "gradient checkpointing" "$WORK/ckpt" "$PY" -m tether.cli "${TRAIN[@]}" --lora true --torch_dtype bfloat16 \
    --gradient_checkpointing true

if [ "$GPUS" -ge 2 ]; then
    LAUNCH=("$PY" -m accelerate.commands.launch --config_file examples/accelerate/fsdp.yaml --num_processes "$GPUS"
            -m tether.cli)
    FSDP=("${TRAIN[@]}" --mixed_precision bf16 --save_steps 5 --batch_size 4)
    TETHER_CRASH_AFTER_STEP=12 "${LAUNCH[@]}" "${FSDP[@]}" --output_dir "$WORK/fsdp" >"$WORK/fsdp-killed.log" 2>&1
    check "FSDP2 on $GPUS GPUs, resumed" "$WORK/fsdp" "${LAUNCH[@]}" "${FSDP[@]}" --resume
    "$PY" -c "
import json, sys
d = json.load(open(sys.argv[1] + '/results.json'))['distributed']
ok = d['sharding'] == 'fsdp2' and d['efficient_loading'] and d['parameters_sharded']
print(('ok       ' if ok else 'FAILED   ') + 'FSDP2 engaged: ' + json.dumps(d))
sys.exit(0 if ok else 1)" "$WORK/fsdp" || FAILED=1
else
    RESULTS+=("skipped  FSDP2: needs 2 GPUs or more (this machine has $GPUS)")
    echo "${RESULTS[-1]}"
fi

check "tether online (own sampler)" "$WORK/online" "$PY" -m tether.cli "${ONLINE[@]}"
VLLM_PYTHON=${VLLM_PYTHON:-.venv-vllm/bin/python}
if "$VLLM_PYTHON" -c "import vllm" 2>/dev/null; then
    check "tether online (vLLM sampler)" "$WORK/online-vllm" "$PY" -m tether.cli "${ONLINE[@]}" --sampler vllm \
        --vllm_python "$VLLM_PYTHON"
else
    RESULTS+=("skipped  tether online with vLLM: no vLLM environment at $VLLM_PYTHON (make vllm, or set VLLM_PYTHON)")
    echo "${RESULTS[-1]}"
fi

echo
echo "gpu_smoke summary ($GPUS GPU(s)):"
printf '  %s\n' "${RESULTS[@]}"
if [ "$FAILED" -eq 0 ]; then rm -rf "$WORK"; else echo "logs kept in $WORK"; fi
exit "$FAILED"
