#!/usr/bin/env bash
# GPU session 11, call b (right after call a on the same H200; LAYERS=4 on an H100, where 8
# layers do not fit): megafleet's AdamW against torch's fused AdamW + megatron's copy, bf16
# moments (the precision-aware optimizer), the GPU tests of the session's changes (wgrad kernel
# with tuple arguments, embedding gradient tied/untied: never run in session 10, AdamW), and
# Qwen3-1.7B full FT (session 10's number was void: NaN).
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
LAYERS=${LAYERS:-8}
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers $LAYERS --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime"
step moe-torch-adam 80 $MOE --adam torch --label s11-torch-adam --json $OUT/moe-adam.json
step moe-bf16-moments 80 $MOE --moments bf16 --label s11-bf16-moments --json $OUT/moe-adam.json
step gpu-tests 330 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_gpu.py tests/gpu/test_embedding_grad_gpu.py tests/gpu/test_adamw_gpu.py
step dense-1.7b 50 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime --label s11-1.7b --json $OUT/dense.json
