#!/usr/bin/env bash
# The GPU smoke run: two GRPO steps through verl with the agentrl agent loop and the search tool,
# then two steps of the local trainer on the GPU (trainer.device=cuda) with the HF engine in bf16,
# its checkpoint loaded back on the CPU and resumed on the GPU, then two steps with the vLLM engine
# (its server on the trainer's GPU, with rollout.gpu_memory_utilization and asleep through each
# update), on the quickstart task; prints tokens/s and seconds per step for each.
#
#   pip install -e ".[gpu]"            # verl[vllm]==0.9.1 (vLLM, torch and transformers as verl pins them)
#   scripts/gpu_smoke.sh MODEL_DIR [OUT_DIR]
#
# MODEL_DIR is a local Hugging Face model directory (e.g. a Qwen2.5-0.5B-Instruct download).
# Written for a machine with NVIDIA GPUs; it has not been run on one yet.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:?usage: scripts/gpu_smoke.sh MODEL_DIR [OUT_DIR]}
OUT=${2:-runs/gpu_smoke}
PY=${PYTHON:-python}
GPUS=$(nvidia-smi -L | wc -l)
# 8 prompts x 4 samples, one minibatch, micro-batches of 1: splits evenly over 1, 2, 4 or 8 GPUs
COMMON=(configs/quickstart.yaml "model.name=$MODEL" sft.enabled=false trainer.steps=2 trainer.eval_every=0
        trainer.eval_before=false trainer.save_every=0 trainer.torch_threads=null trainer.prompts_per_step=8
        trainer.minibatch_size=32 trainer.micro_batch_size=1)

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"
"$PY" -c "import verl, agentrl.verl.plugin as p; print('verl', verl.__version__, p.registered())"

echo "== verl: 2 GRPO steps on $GPUS GPU(s), agent loop agentrl, search tool"
mkdir -p "$OUT"
started=$(date +%s)
"$PY" -m agentrl.cli train "${COMMON[@]}" trainer.backend=verl "output_dir=$OUT/verl" \
  "verl.n_gpus_per_node=$GPUS" 2>&1 | tee "$OUT/verl.log"
echo "verl: $(( $(date +%s) - started )) s in all (start-up included)"
# verl's console logger prints one line of metrics per step
grep -o -E "(timing_s/step|perf/throughput|perf/total_num_tokens|critic/score/mean):[^ ]+" "$OUT/verl.log" || true

step_times() {  # seconds per step and rollout tokens/s from a local run's metrics.jsonl
  "$PY" - "$1" <<'EOF'
import json, sys

for line in open(sys.argv[1]):
    step = json.loads(line)
    if "time/step_s" not in step:
        continue
    tokens = step.get("response_tokens_mean", 0.0) * step.get("trajectories", 0.0)
    print(f"local step {step.get('step')}: {step['time/step_s']:.1f} s, rollout {step['time/rollout_s']:.1f} s, "
          f"{tokens / max(step['time/rollout_s'], 1e-9):.0f} response tokens/s")
EOF
}

echo "== local trainer: 2 GRPO steps, trainer.device=cuda, HF engine, bf16 autocast, KL reference"
HF=("${COMMON[@]}" rollout.engine=hf trainer.device=cuda trainer.precision=bf16 algo.kl_coef=0.01
    trainer.save_every=1 "output_dir=$OUT/local_hf")
"$PY" -m agentrl.cli train "${HF[@]}" trainer.steps=1 2>&1 | tee "$OUT/local_hf.log"
# the GPU-written checkpoint loads on the CPU, then the run resumes on the GPU for its second step
"$PY" - "$OUT/local_hf" <<'EOF'
import sys

from agentrl.trainer.checkpoint import latest_checkpoint, load_training_state

state = load_training_state(latest_checkpoint(sys.argv[1]) / "training.pt")
moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"]
assert moments and all(t.device.type == "cpu" for t in moments), "optimizer state not mapped to the CPU"
print("the checkpoint loads on the CPU:", len(moments), "optimizer tensors")
EOF
"$PY" -m agentrl.cli train "${HF[@]}" resume=true 2>&1 | tee -a "$OUT/local_hf.log"
step_times "$OUT/local_hf/metrics.jsonl"

echo "== local trainer: 2 GRPO steps, trainer.device=cuda, rollout.engine=vllm"
"$PY" -m agentrl.cli train "${COMMON[@]}" rollout.engine=vllm trainer.device=cuda "output_dir=$OUT/local" 2>&1 \
  | tee "$OUT/local.log"
step_times "$OUT/local/metrics.jsonl"
