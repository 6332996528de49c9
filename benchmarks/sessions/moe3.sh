#!/usr/bin/env bash
# GPU session moe3 (nvidia-h200): the same code as moe2 at micro-batch 2 and 4 (8 sequences of
# 4096 tokens per step either way), runtime and Hugging Face grouped_mm at the same micro-batch.
source benchmarks/sessions/prelude.sh
T="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --json $OUT/throughput-qwen3-30b-a3b-8l.json"
step mb2 200 $T --impl runtime,hf --label moe3-mb2 --micro-batch 2
step mb4 200 $T --impl runtime,hf --label moe3-mb4 --micro-batch 4
