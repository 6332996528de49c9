#!/usr/bin/env bash
# GPU session lora-a (nvidia-h200): LoRA r=16 alpha 32 on q/k/v/o/gate/up/down, bf16, one 4096-token
# sequence per micro-batch, 8 per step. Qwen3-8B: runtime (the HF + PEFT side measured 7,701 tok/s,
# 63.5 GiB in the issue); Qwen3-1.7B: runtime and HF + PEFT side by side.
source benchmarks/sessions/prelude.sh
T="python3 benchmarks/train_throughput.py --lora --seq-len 4096 --global-batch 8 --warmup 2 --steps 5"
step lora-8b 140 $T --shape qwen3-8b --impl runtime --label lora-r16 --json $OUT/lora-8b.json
step lora-1.7b 140 $T --shape qwen3-1.7b --impl runtime,hf --label lora-r16 --json $OUT/lora-1.7b.json
step lora-8b-recompute 85 $T --shape qwen3-8b --impl runtime --recompute full --label lora-r16-full-recompute --json $OUT/lora-8b-recompute.json
