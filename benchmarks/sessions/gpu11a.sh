#!/usr/bin/env bash
# GPU session 11, call a (nvidia-h200, 2026-12-05): the issue 16 target. Qwen3-30B-A3B cut to 8
# layers (full FT, mb1, 4096 x 8) at the defaults beside HF grouped_mm, bf16 Adam moments, the
# LoRA / DPO GPU tests through the real runtime with megafleet's AdamW, and a profile.
# (session 10 wrote most of these steps as gpu10b.sh; no H200 came, so they never ran.)
# New defaults since session 10: the wgrad kernel with tuple arguments, megafleet's AdamW
# (train/adamw.py), both checked on an H100 first (gpu11-h100a.sh). Trimmed to the device time left.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
ADAM=megafleet
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --adam $ADAM"
step moe-full-auto 150 $MOE --impl runtime,hf --label s11-auto --json $OUT/moe-full.json
step moe-full-bf16-moments 80 $MOE --impl runtime --moments bf16 --label s11-bf16-moments --json $OUT/moe-full.json
step gpu-tests-lora-dpo 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_lora_moe_gpu.py tests/gpu/test_dpo_gpu.py
step moe-full-auto-profile 100 $MOE --impl runtime --label s11-auto-profiled --profile $OUT/profile-moe-auto.txt --json $OUT/moe-full.json
