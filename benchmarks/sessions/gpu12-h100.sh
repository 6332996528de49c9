#!/usr/bin/env bash
# GPU session 12, H100 call (nvidia-h100-x1, 2026-12-06; no H200 came in seven tries): the new
# Triton kernels (SwiGLU x router weight, slot sums) on the GPU, then Qwen3-30B-A3B cut to 4
# layers beside HF as in session 11 (gpu11-h100a.sh: 105,864 tok/s vs 57,276), a profile, and
# the LoRA / DPO GPU tests through the runtime with megafleet's AdamW.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 4 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step gpu-tests-swiglu-moe 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py tests/gpu/test_moe_gpu.py
step moe-4l-defaults 130 $MOE --impl runtime,hf --label s12-4l-defaults --json $OUT/moe-4l.json
step moe-4l-profile 70 $MOE --impl runtime --label s12-4l-profiled --profile $OUT/profile-moe-4l.txt --json $OUT/moe-4l.json
step gpu-tests-lora-dpo 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_lora_moe_gpu.py tests/gpu/test_dpo_gpu.py
