#!/usr/bin/env bash
# GPU session 9, call c (nvidia-h200): the MoE GPU tests again (call a's failed on the test
# helper dropping PYTHONPATH, so the runtime subprocess found no megatron), LoRA DPO beside
# TRL + PEFT (call b's failed on a benchmark argument), and Qwen3-1.7B full fine-tuning with
# both optimizer steps, alternated twice (call b's single pair differed by 1.8% the other way).
source benchmarks/sessions/prelude.sh
step gpu-tests-moe-lora 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_lora_moe_gpu.py
step dpo-lora-mb4 130 python3 benchmarks/dpo_throughput.py --shape qwen3-1.7b --global-batch 16 --micro-batch 4 --warmup 2 --steps 5 --lora --impl runtime-dpo,trl --label s9-lora --json $OUT/dpo-lora.json
F17="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 8 --impl runtime --json $OUT/full-1.7b.json"
for i in 1 2; do
  step full-1.7b-folded-$i 80 $F17 --label s9c-folded
  step full-1.7b-megatron-step-$i 80 $F17 --megatron-optimizer-step --label s9c-megatron-step
done
