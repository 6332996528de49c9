#!/usr/bin/env bash
# GPU session 11, call b (one H100 or H200, whichever came; 2026-12-05): the expert wgrad kernel
# rewritten with tuple arguments (compile, speed by depth, the MoE GPU tests), the embedding
# gradient GPU test (tied and untied; never run in session 10), Qwen3-1.7B full FT with and
# without the embedding gradient by rows (session 10's numbers were void: NaN), and the 4-layer
# Qwen3-30B-A3B defaults to compare with session 10's H100 100,868 tok/s.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
DENSE="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime"
step kernel 60 python3 benchmarks/expert_wgrad.py --json $OUT/expert-wgrad.json
step gpu-tests-moe-embedding 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_gpu.py tests/gpu/test_embedding_grad_gpu.py
step dense-1.7b 60 $DENSE --label s11-1.7b --json $OUT/dense.json
step dense-1.7b-dense-embedding-grad 60 $DENSE --option fused_embedding_grad=false --label s11-1.7b-dense-embedding-grad --json $OUT/dense.json
step moe-4l-auto 100 python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 4 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime --label s11-4l-auto --json $OUT/moe-4l.json
