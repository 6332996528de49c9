#!/usr/bin/env bash
# GPU session 11, H100 call b (nvidia-h100-x1, 2026-12-06; the H200 did not come): megafleet's
# AdamW through the real runtime in LoRA, full MoE and DPO GPU tests, and Qwen3-1.7B full FT
# (tied embeddings; session 10's number was void: NaN).
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step gpu-tests-lora-dpo 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_lora_moe_gpu.py tests/gpu/test_dpo_gpu.py
step dense-1.7b 70 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime --label s11-1.7b --json $OUT/dense.json
