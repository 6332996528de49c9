#!/usr/bin/env bash
# GPU session 3d (nvidia-h200-x2, GPU 0): Qwen3-1.7B, final configuration (uniform-pack path, GC
# frozen after setup) at micro-batch 2 and 1 against Hugging Face on the faster host.
source benchmarks/sessions/prelude.sh
# Ran with the gc-freeze experiment in place (reverted since: it gained nothing).
export CUDA_VISIBLE_DEVICES=0
T="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --json $OUT/throughput-1.7b.json"
step mb2 200 $T --impl runtime,hf --label uniform+gcfreeze-mb2 --micro-batch 2 --warmup 3 --steps 10
step mb1 200 $T --impl runtime,hf --label uniform+gcfreeze --warmup 3 --steps 10
