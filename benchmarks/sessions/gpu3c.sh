#!/usr/bin/env bash
# GPU session 3c (nvidia-h200): Qwen3-1.7B with the uniform-pack path and the garbage collector
# frozen after setup, against Hugging Face; the same without the freeze, with micro-batch 2, and a
# profile of the final configuration.
# The gc-freeze experiment (freeze_gc in the runtime, --no-gc-freeze here) gained nothing and was
# reverted after this session; the second step no longer runs as written.
source benchmarks/sessions/prelude.sh
T="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --json $OUT/throughput-1.7b.json"
step gc-freeze 200 $T --impl runtime,hf --label uniform+gcfreeze --warmup 3 --steps 10
step no-gc-freeze 120 $T --impl runtime --label uniform-no-gcfreeze --no-gc-freeze --warmup 3 --steps 10
step mb2 200 $T --impl runtime,hf --label uniform+gcfreeze-mb2 --micro-batch 2 --warmup 3 --steps 10
step profile 150 $T --impl runtime --label uniform+gcfreeze-profiled --warmup 3 --steps 10 --profile $OUT/profile-1.7b-final.txt
