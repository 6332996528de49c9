#!/usr/bin/env bash
# GPU session lora-c (nvidia-h200), NOT RUN YET (the helper's device budget was spent): the TP=1
# path that runs base GEMM and adapter as one autograd node (remote_runtime/model/lora.py,
# _LoraLinear). Qwen3-1.7B and Qwen3-8B, runtime and Hugging Face + PEFT, then 8B full recompute.
source benchmarks/sessions/prelude.sh
T="python3 benchmarks/train_throughput.py --lora --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step lora-1.7b 150 $T --shape qwen3-1.7b --impl runtime,hf --label lora-r16-one-node --json $OUT/lora-1.7b.json
step lora-8b 150 $T --shape qwen3-8b --impl runtime,hf --label lora-r16-one-node --json $OUT/lora-8b.json
step lora-8b-recompute 120 $T --shape qwen3-8b --impl runtime,hf --recompute full --label lora-r16-one-node-full-recompute --json $OUT/lora-8b-recompute.json
step profile-1.7b 100 $T --shape qwen3-1.7b --impl runtime --label lora-r16-one-node-profiled --profile $OUT/profile-lora-1.7b.txt
