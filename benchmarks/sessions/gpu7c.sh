#!/usr/bin/env bash
# GPU session 7c (nvidia-h200, 2026-12-05, lead, merged main): the GPU tests (MoE expert LoRA on
# torch._grouped_mm, DPO losses without host syncs), Qwen3-30B-A3B (8 layers) LoRA beside HF + PEFT
# on the same targets, Qwen3-1.7B LoRA at micro-batch 2 beside HF + PEFT at micro-batch 2, LoRA DPO
# beside TRL + PEFT at 4 pairs per micro-batch.
source benchmarks/sessions/prelude.sh
M="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --lora"
step gpu-tests 120 python3 -m pytest -q -p no:cacheprovider tests/gpu
step moe-lora-all 180 $M --impl runtime,hf --label s7c-moe-lora-all --json $OUT/moe-lora.json
step dpo-lora-mb4 130 python3 benchmarks/dpo_throughput.py --shape qwen3-1.7b --global-batch 16 --micro-batch 4 --warmup 2 --steps 5 --lora --impl runtime-dpo,trl --label s7c-lora --json $OUT/dpo-lora.json
step lora-1.7b-mb2 90 python3 benchmarks/train_throughput.py --lora --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --micro-batch 2 --impl runtime,hf --label s7c --json $OUT/lora-1.7b.json
step moe-lora-attn 80 $M --impl runtime --lora-targets q_proj,k_proj,v_proj,o_proj --label s7c-moe-lora-attn --json $OUT/moe-lora.json
