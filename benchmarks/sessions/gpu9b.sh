#!/usr/bin/env bash
# GPU session 9, call b (nvidia-h200, same machine as call a): LoRA DPO beside TRL + PEFT (4 pairs
# per micro-batch), Qwen3-1.7B LoRA at micro-batch 2 beside HF + PEFT, Qwen3-8B LoRA (mb 2) with
# the runtime's optimizer step, Qwen3-1.7B full fine-tuning with both optimizer steps.
source benchmarks/sessions/prelude.sh
step dpo-lora-mb4 120 python3 benchmarks/dpo_throughput.py --shape qwen3-1.7b --global-batch 16 --micro-batch 4 --warmup 2 --steps 5 --lora --impl runtime-dpo,trl --label s9-lora --json $OUT/dpo-lora.json
step lora-1.7b-mb2 90 python3 benchmarks/train_throughput.py --lora --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --micro-batch 2 --impl runtime,hf --label s9 --json $OUT/lora.json
step lora-8b-mb2 150 python3 benchmarks/train_throughput.py --lora --shape qwen3-8b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --micro-batch 2 --impl runtime --label s9 --json $OUT/lora.json
F17="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime"
step full-1.7b-folded 80 $F17 --label s9-folded --json $OUT/full-1.7b.json
step full-1.7b-megatron-step 80 $F17 --megatron-optimizer-step --label s9-megatron-step --json $OUT/full-1.7b.json
