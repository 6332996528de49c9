#!/usr/bin/env bash
# GPU session 2c: Qwen3-8B with DP=2 (distributed optimizer, overlapped reduce) and Hugging Face
# on one GPU beside it.
source benchmarks/sessions/prelude.sh
step tp-8b-dp2 300 torchrun --standalone --nproc_per_node 2 benchmarks/train_throughput.py --shape qwen3-8b --overlap --impl runtime,hf --label dp2-distopt-overlap --warmup 2 --steps 4 --json $OUT/throughput-8b-dp2.json
