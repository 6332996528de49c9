#!/usr/bin/env bash
# GPU session 1b: throughput with compiled norm/rope vs Hugging Face (+ profile); conversion evidence.
source benchmarks/sessions/prelude.sh
step tp-fused 280 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --impl runtime,hf --label fused --profile $OUT/profile-1.7b.txt --json $OUT/throughput-b.json
step convert-tp1 280 python3 benchmarks/convert_evidence.py --out $OUT/convert-tp1.json
