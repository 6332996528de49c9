#!/usr/bin/env bash
# GPU session 7a (nvidia-h200, 2026-12-05, lead): where the remaining time goes.
# LoRA at micro-batch 2 (the 1.7B step is host-bound at mb1), SFT on packed documents of equal
# (uniform path) vs unequal lengths (varlen path; DPO's micro-batches), DPO micro-batch sweep.
source benchmarks/sessions/prelude.sh
T="python3 benchmarks/train_throughput.py --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --impl runtime"
step lora-1.7b-mb1 120 $T --lora --shape qwen3-1.7b --label s7a --json $OUT/lora.json
step lora-1.7b-mb2 120 $T --lora --shape qwen3-1.7b --micro-batch 2 --label s7a --json $OUT/lora.json
step lora-8b-mb2 150 $T --lora --shape qwen3-8b --micro-batch 2 --label s7a --json $OUT/lora.json
S="python3 benchmarks/train_throughput.py --global-batch 8 --warmup 2 --steps 5 --impl runtime --shape qwen3-1.7b --docs-per-seq 4"
step sft-uniform 120 $S --seq-len 4096 --label s7a-uniform --json $OUT/packed.json
step sft-varlen 150 $S --seq-len 4097 --label s7a-varlen --profile $OUT/profile-varlen.txt --json $OUT/packed.json
D="python3 benchmarks/dpo_throughput.py --shape qwen3-1.7b --global-batch 16 --warmup 2 --steps 5 --impl runtime-dpo"
step dpo-mb2 150 $D --micro-batch 2 --label s7a --json $OUT/dpo-mb2.json
step dpo-mb4 150 $D --micro-batch 4 --label s7a --json $OUT/dpo-mb4.json
