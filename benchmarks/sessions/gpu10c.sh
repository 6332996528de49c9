#!/usr/bin/env bash
# GPU session 10, call c (one H100: no H200 came in five tries, device time nearly spent): the tuned
# expert weight-gradient tiles on Qwen3-30B-A3B cut to 4 layers (the 8-layer benchmark needs an
# H200) beside HF, depth 1 for the ablation, the MoE GPU tests, the kernel, a profile, and
# Qwen3-1.7B full FT with and without the embedding gradient by rows (in that order, as far
# as the remaining device time goes).
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 4 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
DENSE="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime"
step gpu-tests-moe 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_gpu.py
step moe4-auto 60 $MOE --impl runtime,hf --label s10c-h100-4l-auto --json $OUT/moe4.json
step moe4-defer1 40 $MOE --impl runtime --option moe_wgrad_defer=1 --label s10c-h100-4l-defer1 --json $OUT/moe4.json
step kernel 25 python3 benchmarks/expert_wgrad.py --json $OUT/expert-wgrad.json
step dense-1.7b 40 $DENSE --label s10c-1.7b --json $OUT/dense.json
step dense-1.7b-dense-embedding-grad 40 $DENSE --option fused_embedding_grad=false --label s10c-1.7b-dense-embedding-grad --json $OUT/dense.json
step moe4-auto-profile 45 $MOE --impl runtime --label s10c-h100-4l-auto-profiled --profile $OUT/profile-moe4-auto.txt --json $OUT/moe4.json
