#!/usr/bin/env bash
# Not run in session 10 (no H200 came); the script to run first next session.
# GPU session 10, call b (nvidia-h200, 2026-12-05): the tuned expert weight-gradient tiles (from
# the H100 sweep). Qwen3-30B-A3B cut to 8 layers (full FT, mb1) at the defaults beside HF, a
# profile of the defaults, ablations (depth 1; the dense embedding gradient), the kernel by depth,
# the MoE GPU tests, and Qwen3-1.7B full FT with and without the embedding gradient by rows.
# Most important first: device time was short.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
DENSE="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime"
step moe-full-auto 150 $MOE --impl runtime,hf --label s10-auto --json $OUT/moe-full.json
step moe-full-auto-profile 100 $MOE --impl runtime --label s10-auto-profiled --profile $OUT/profile-moe-auto.txt --json $OUT/moe-full.json
step moe-full-defer1 80 $MOE --impl runtime --option moe_wgrad_defer=1 --label s10-defer1 --json $OUT/moe-full.json
step moe-full-dense-embedding-grad 80 $MOE --impl runtime --option fused_embedding_grad=false --label s10-dense-embedding-grad --json $OUT/moe-full.json
step kernel 40 python3 benchmarks/expert_wgrad.py --json $OUT/expert-wgrad.json
step gpu-tests-moe-embedding 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_gpu.py tests/gpu/test_embedding_grad_gpu.py
step dense-1.7b 60 $DENSE --label s10-1.7b --json $OUT/dense.json
step dense-1.7b-dense-embedding-grad 60 $DENSE --option fused_embedding_grad=false --label s10-1.7b-dense-embedding-grad --json $OUT/dense.json
