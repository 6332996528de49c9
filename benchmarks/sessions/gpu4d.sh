#!/usr/bin/env bash
# GPU session 4d (nvidia-h200, nothing else running): the final code. Qwen3-1.7B runtime vs
# Hugging Face at micro-batch 1 and 2, the same-session baseline with the torch.compile'd kernels
# (session 3's setup), and a profile. The RMSNorm backward is back to 4 programs per SM (4c's 16
# made its atomic weight-gradient adds contend: 45 µs per call vs 34).
source benchmarks/sessions/prelude.sh
T="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --json $OUT/throughput-1.7b.json --warmup 3 --steps 10"
step final-mb1 200 $T --impl runtime,hf --label final
step final-mb2 200 $T --impl runtime,hf --label final-mb2 --micro-batch 2
step compile-mb1 100 $T --impl runtime --label compile-kernels --option kernels=compile
step profile 120 $T --impl runtime --label final-profiled --profile $OUT/profile-1.7b-final.txt
