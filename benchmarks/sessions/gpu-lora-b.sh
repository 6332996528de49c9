#!/usr/bin/env bash
# GPU session lora-b (nvidia-h200): the fused adapter parameters (two GEMMs per adapted layer);
# Qwen3-1.7B with a profile of two steps, then Qwen3-8B. Hugging Face + PEFT: session lora-a.
source benchmarks/sessions/prelude.sh
T="python3 benchmarks/train_throughput.py --lora --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime"
step lora-1.7b 100 $T --shape qwen3-1.7b --label lora-r16-fused --json $OUT/lora-1.7b.json --profile $OUT/profile-lora-1.7b.txt
step lora-8b 100 $T --shape qwen3-8b --label lora-r16-fused --json $OUT/lora-8b.json
