#!/usr/bin/env bash
# GPU session 10, call a (nvidia-h200, 2026-12-05): deferred MoE expert weight gradients
# (model/expert_wgrad.py) and the word embedding's gradient by rows (model/embedding.py). The
# kernel alone by depth, the MoE GPU tests, then Qwen3-30B-A3B cut to 8 layers (full FT, mb1) at
# the defaults beside HF, and ablations: depth 1 and 8, the dense embedding gradient; a profile.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step kernel 90 python3 benchmarks/expert_wgrad.py --json $OUT/expert-wgrad.json
step gpu-tests-moe 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_gpu.py
step moe-full-auto 170 $MOE --impl runtime,hf --label s10-auto --json $OUT/moe-full.json
step moe-full-defer1 100 $MOE --impl runtime --option moe_wgrad_defer=1 --label s10-defer1 --json $OUT/moe-full.json
step moe-full-defer8 100 $MOE --impl runtime --option moe_wgrad_defer=8 --label s10-defer8 --json $OUT/moe-full.json
step moe-full-dense-embedding-grad 100 $MOE --impl runtime --option fused_embedding_grad=false --label s10-dense-embedding-grad --json $OUT/moe-full.json
step moe-full-auto-profile 120 $MOE --impl runtime --label s10-auto-profiled --profile $OUT/profile-moe-auto.txt --json $OUT/moe-full.json
