#!/usr/bin/env bash
# GPU session 9, call a (nvidia-h200, 2026-12-05): the GPU tests (incl. session 8's unrun MoE LoRA
# test: the frozen router moved to the GPU), Qwen3-30B-A3B (8 layers) full fine-tuning with the
# runtime's optimizer step (gradient scaling folded into Adam) beside HF and beside megatron-core's
# own step, and the MoE LoRA record beside HF + PEFT.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step gpu-tests 100 python3 -m pytest -q -p no:cacheprovider tests/gpu
step moe-full-folded 170 $MOE --impl runtime,hf --label s9-folded --json $OUT/moe-full.json
step moe-full-megatron-step 100 $MOE --impl runtime --megatron-optimizer-step --label s9-megatron-step --json $OUT/moe-full.json
step moe-lora-all 170 $MOE --lora --impl runtime,hf --label s9-moe-lora-all --json $OUT/moe-lora.json
