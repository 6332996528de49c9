#!/usr/bin/env bash
# GPU session moe1 (nvidia-h200): MoE grouped experts against the exact loop, then
# Qwen3-30B-A3B cut to 8 layers (5.6B params) against Hugging Face grouped_mm experts.
source benchmarks/sessions/prelude.sh
step gpu-tests 120 bash -c "python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_moe_gpu.py > $OUT/gpu-tests-moe.txt 2>&1; tail -3 $OUT/gpu-tests-moe.txt"
T="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step throughput 300 $T --impl runtime,hf --label moe1 --json $OUT/throughput-qwen3-30b-a3b-8l.json
