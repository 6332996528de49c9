#!/usr/bin/env bash
# GPU session 8 (nvidia-h200, 2026-12-05, merged main; 795 s of device time left): session 7c's
# script cut to what the open issues still need: the GPU tests (MoE expert LoRA on
# torch._grouped_mm, DPO losses without host syncs, kernels), Qwen3-30B-A3B (8 layers) LoRA beside
# HF + PEFT on the same targets, LoRA DPO beside TRL + PEFT at 4 pairs per micro-batch, Qwen3-1.7B
# LoRA at micro-batch 2 beside HF + PEFT at micro-batch 2.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step gpu-tests 100 python3 -m pytest -q -p no:cacheprovider tests/gpu
step moe-lora-all 170 python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --lora --impl runtime,hf --label s8-moe-lora-all --json $OUT/moe-lora.json
step dpo-lora-mb4 120 python3 benchmarks/dpo_throughput.py --shape qwen3-1.7b --global-batch 16 --micro-batch 4 --warmup 2 --steps 5 --lora --impl runtime-dpo,trl --label s8-lora --json $OUT/dpo-lora.json
step lora-1.7b-mb2 90 python3 benchmarks/train_throughput.py --lora --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --micro-batch 2 --impl runtime,hf --label s8 --json $OUT/lora-1.7b.json
