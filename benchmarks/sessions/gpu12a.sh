#!/usr/bin/env bash
# GPU session 12, call a (nvidia-h200, 2026-12-06): the issue 16 target. First the new Triton
# SwiGLU x router weight and slot-sum kernels' GPU tests, then Qwen3-30B-A3B cut to 8 layers (full FT, mb1,
# 4096 x 8) at the defaults beside HF grouped_mm, a profile, and bf16 Adam moments.
# (gpu11a.sh with the kernel tests in front; the LoRA/DPO GPU tests moved to gpu12b.sh.)
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step gpu-tests-swiglu-moe 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py tests/gpu/test_moe_gpu.py
step moe-full-auto 170 $MOE --impl runtime,hf --label s12-auto --json $OUT/moe-full.json
step moe-full-auto-profile 100 $MOE --impl runtime --label s12-auto-profiled --profile $OUT/profile-moe-auto.txt --json $OUT/moe-full.json
step moe-full-bf16-moments 80 $MOE --impl runtime --moments bf16 --label s12-bf16-moments --json $OUT/moe-full.json
