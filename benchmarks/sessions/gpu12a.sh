#!/usr/bin/env bash
# GPU session 12, call a (nvidia-h200, 2026-12-06): the issue 16 target. First the new Triton
# SwiGLU x router weight and slot-sum kernels' GPU tests, then Qwen3-30B-A3B cut to 8 layers (full FT, mb1,
# 4096 x 8) at the defaults beside HF grouped_mm, a profile, and bf16 Adam moments.
# Then the LoRA / DPO GPU tests through the runtime (megafleet AdamW) and Qwen3-1.7B beside HF.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step gpu-tests-swiglu-moe 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py tests/gpu/test_moe_gpu.py
step moe-full-auto 170 $MOE --impl runtime,hf --label s12-auto --json $OUT/moe-full.json
step moe-full-auto-profile 100 $MOE --impl runtime --label s12-auto-profiled --profile $OUT/profile-moe-auto.txt --json $OUT/moe-full.json
step moe-full-bf16-moments 80 $MOE --impl runtime --moments bf16 --label s12-bf16-moments --json $OUT/moe-full.json
step gpu-tests-lora-dpo 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_lora_moe_gpu.py tests/gpu/test_dpo_gpu.py
step dense-1.7b 80 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime,hf --label s12-1.7b --json $OUT/dense.json
