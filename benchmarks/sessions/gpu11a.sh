#!/usr/bin/env bash
# GPU session 11, call a (nvidia-h200, 2026-12-05): the issue 16 target. Qwen3-30B-A3B cut to 8
# layers (full FT, mb1, 4096 x 8) at the defaults beside HF grouped_mm, a profile of the defaults,
# ablations (deferral depth 1; the dense embedding gradient) and the wgrad kernel by depth.
# (session 10 wrote most of these steps as gpu10b.sh; no H200 came, so they never ran.)
# New defaults since session 10: the wgrad kernel with tuple arguments, megafleet's AdamW
# (train/adamw.py). Its kernel test runs first; if it fails the runs fall back to torch's AdamW.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
ADAM=megafleet
step adamw-kernel-test 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_adamw_gpu.py -k "kernel or bf16" || ADAM=torch
echo "ADAM=$ADAM"
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --adam $ADAM"
step moe-full-auto 150 $MOE --impl runtime,hf --label s11-auto --json $OUT/moe-full.json
step moe-full-auto-profile 100 $MOE --impl runtime --label s11-auto-profiled --profile $OUT/profile-moe-auto.txt --json $OUT/moe-full.json
step moe-full-defer1 80 $MOE --impl runtime --option moe_wgrad_defer=1 --label s11-defer1 --json $OUT/moe-full.json
step moe-full-dense-embedding-grad 80 $MOE --impl runtime --option fused_embedding_grad=false --label s11-dense-embedding-grad --json $OUT/moe-full.json
step kernel 40 python3 benchmarks/expert_wgrad.py --json $OUT/expert-wgrad.json
