#!/usr/bin/env bash
# GPU session 6 (nvidia-h200, 2026-12-04, lead): run twice; the first call found LoRA broken by the
# merge (layout_for), the second (after the fix, without the moe step) measured LoRA.
# the TP=1 path that runs base GEMM and adapter as one autograd node (model/lora.py _LoraLinear).
source benchmarks/sessions/prelude.sh
T="python3 benchmarks/train_throughput.py --lora --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step lora-1.7b 170 $T --shape qwen3-1.7b --impl runtime,hf --label lora-r16-one-node --json $OUT/lora-1.7b.json
step lora-8b 150 $T --shape qwen3-8b --impl runtime --label lora-r16-one-node --json $OUT/lora-8b.json
step moe-8l 120 python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime --label moe-merged-main --json $OUT/moe-8l.json
