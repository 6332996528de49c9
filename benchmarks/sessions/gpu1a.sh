#!/usr/bin/env bash
# GPU session 1a (nvidia-h200-x2): environment report, first end-to-end SFT on GPU (TP1, TP2),
# throughput with eager norm/rope.
source benchmarks/sessions/prelude.sh
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
python3 -c "import torch, megatron.core, transformers, triton; print(torch.__version__, megatron.core.__version__, transformers.__version__, triton.__version__)"
step envcheck 60 bash -c "python3 scripts/check_megatron_env.py --json --workdir /tmp > $OUT/envcheck-h200x2.json; python3 scripts/check_megatron_env.py --print-te-env > $OUT/te-env.txt 2>&1"
step sft-smoke 250 python3 benchmarks/sft_evidence.py --shape qwen3-0.6b --steps 30 --log-every 5 --rows 6000 --layouts tp1:1,tp2:2 --out /tmp/sft --json $OUT/sft-smoke.json
for f in /tmp/sft/*.log; do echo "--- $f"; tail -8 "$f"; done
step tp-eager 180 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --impl runtime --option fused_norm=false --option fused_rope=false --label eager-norm-rope --steps 5 --json $OUT/throughput-a.json
