#!/usr/bin/env bash
# GPU session 3b (nvidia-h200-x2): 200-step SFT of a Qwen3-0.6B-shaped model at TP=1, TP=2 and
# DP=2 (4 packs of 2048 tokens per micro-batch, global batch 8), losses compared.
source benchmarks/sessions/prelude.sh
step sft-evidence 560 python3 benchmarks/sft_evidence.py --shape qwen3-0.6b --steps 200 --log-every 10 --rows 20000 --micro-batch 4 --layouts tp1:1,tp2:2,dp2:2 --out /tmp/sft --json $OUT/sft-evidence.json
for f in /tmp/sft/*.log; do echo "--- $f"; grep -E "^step|error|Error" "$f" | tail -3; done
