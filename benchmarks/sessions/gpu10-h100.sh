#!/usr/bin/env bash
# GPU session 10, H100 call (no H200 could be started): the same changes as gpu10a.sh on a card
# that cannot hold the 8-layer benchmark (99.9 GiB), so Qwen3-30B-A3B cut to 4 layers: the kernel
# by depth, all GPU tests, runtime defaults beside HF, ablations (depth 1, dense embedding grad).
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 4 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step kernel 90 python3 benchmarks/expert_wgrad.py --json $OUT/expert-wgrad.json
step gpu-tests 300 python3 -m pytest -q -p no:cacheprovider tests/gpu
step moe4-auto 150 $MOE --impl runtime,hf --label s10-h100-4l-auto --json $OUT/moe4.json
step moe4-defer1 90 $MOE --impl runtime --option moe_wgrad_defer=1 --label s10-h100-4l-defer1 --json $OUT/moe4.json
step moe4-dense-embedding-grad 90 $MOE --impl runtime --option fused_embedding_grad=false --label s10-h100-4l-dense-embedding-grad --json $OUT/moe4.json
