#!/usr/bin/env bash
# GPU session 7b (nvidia-h200, 2026-12-05, lead): why DPO at 2 pairs per micro-batch is slow
# (27.9k tok/s against 45.0k at 4 pairs, 7a), and runtime vs TRL at equal micro-batches.
source benchmarks/sessions/prelude.sh
D="python3 benchmarks/dpo_throughput.py --shape qwen3-1.7b --global-batch 16 --warmup 2 --steps 5"
step dpo-mb2-profile 150 $D --micro-batch 2 --impl runtime-dpo --label s7b-profile --profile $OUT/profile-dpo-mb2.txt --json $OUT/dpo.json
step dpo-mb2-fixed 120 $D --micro-batch 2 --impl runtime-dpo --prompt 500,500 --answer 450,451 --label s7b-near-fixed --json $OUT/dpo.json
step dpo-mb4-trl 240 $D --micro-batch 4 --impl runtime-dpo,runtime-sft,trl --label s7b --json $OUT/dpo.json
