#!/usr/bin/env bash
# GPU session moe2 (nvidia-h200): expert weight gradients straight into the fp32 main_grad
# (Triton grouped GEMM) and in the parameter's layout; micro-batch 1 and 2; ablation without the
# fused weight gradient; a profile of the runtime; Hugging Face grouped_mm in the same run.
source benchmarks/sessions/prelude.sh
step gpu-tests 120 bash -c "python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_moe_gpu.py > $OUT/gpu-tests-moe.txt 2>&1; tail -3 $OUT/gpu-tests-moe.txt"
T="python3 benchmarks/train_throughput.py --shape qwen3-30b-a3b --num-layers 8 --seq-len 4096 --global-batch 8 --warmup 2 --steps 5 --json $OUT/throughput-qwen3-30b-a3b-8l.json"
step mb1 200 $T --impl runtime,hf --label moe2-mb1
step mb2 120 $T --impl runtime --label moe2-mb2 --micro-batch 2
step no-wgrad-fusion 120 $T --impl runtime --label moe2-mb1-no-wgrad-fusion --option moe_wgrad_fusion=false
step profile 120 $T --impl runtime --label moe2-mb1-profiled --steps 2 --profile $OUT/profile-qwen3-30b-a3b-8l.txt
