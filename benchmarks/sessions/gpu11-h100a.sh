#!/usr/bin/env bash
# GPU session 11, H100 call a (nvidia-h100-x1, 2026-12-05; no H200 came in six tries): the new
# defaults on Qwen3-30B-A3B cut to 4 layers (8 do not fit 80 GB) beside HF grouped_mm, as in
# session 10's H100 calls (100,868 tok/s, 1.75x): the wgrad kernel with tuple arguments and
# megafleet's AdamW (train/adamw.py), its ablation (torch's fused AdamW + megatron's copy) and bf16
# moments. The AdamW kernel test runs first; if it fails the runs fall back to torch's AdamW.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
ADAM=megafleet
step adamw-kernel-test 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_adamw_gpu.py -k "kernel or bf16" || ADAM=torch
echo "ADAM=$ADAM"
MOE="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 4 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step moe-4l-defaults 130 $MOE --impl runtime,hf --adam $ADAM --label s11-4l-defaults --json $OUT/moe-4l.json
step moe-4l-torch-adam 70 $MOE --impl runtime --adam torch --label s11-4l-torch-adam --json $OUT/moe-4l.json
step moe-4l-bf16-moments 70 $MOE --impl runtime --moments bf16 --label s11-4l-bf16-moments --json $OUT/moe-4l.json
step kernel 40 python3 benchmarks/expert_wgrad.py --json $OUT/expert-wgrad.json
