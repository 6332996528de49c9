#!/usr/bin/env bash
# GPU session 2b: 200-step SFT of a Qwen3-0.6B-shaped model (TP1, TP2, DP2); Qwen3-8B at TP=2.
source benchmarks/sessions/prelude.sh
python3 -c "from remote_runtime.model.wgrad import _works; print('wgrad fusion works:', _works())" 2>&1 | tail -1
step sft-evidence 330 python3 benchmarks/sft_evidence.py --shape qwen3-0.6b --steps 200 --log-every 10 --rows 20000 --layouts tp1:1,tp2:2,dp2:2 --out /tmp/sft --json $OUT/sft-evidence.json
for f in /tmp/sft/*.log; do echo "--- $f"; grep -E "^step|error|Error" "$f" | tail -3; done
step tp-8b-tp2 220 torchrun --standalone --nproc_per_node 2 benchmarks/train_throughput.py --shape qwen3-8b --tp 2 --sp --impl runtime --label tp2-sp --warmup 2 --steps 4 --json $OUT/throughput-8b.json
