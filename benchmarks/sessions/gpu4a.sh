#!/usr/bin/env bash
# GPU session 4a (nvidia-h200): the Triton RMSNorm/RoPE/SwiGLU (`remote_runtime/model/ops.py`)
# against the torch.compile'd ones: kernel tests, per-op GPU and host time, and Qwen3-1.7B
# throughput with each kernel family against Hugging Face, then a profile of the Triton run.
source benchmarks/sessions/prelude.sh
step gpu-tests 150 bash -c "python3 -m pytest -q -p no:cacheprovider -rs tests/gpu > $OUT/gpu-tests.txt 2>&1; tail -8 $OUT/gpu-tests.txt"
step fused-ops 150 python3 benchmarks/fused_ops.py --shape qwen3-1.7b --json $OUT/fused-ops.json
T="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --json $OUT/throughput-1.7b.json --warmup 3 --steps 10"
step triton-vs-hf 200 $T --impl runtime,hf --label triton --option kernels=triton
step compile 100 $T --impl runtime --label compile --option kernels=compile
step triton-mb2 100 $T --impl runtime --label triton-mb2 --option kernels=triton --micro-batch 2
step profile 120 $T --impl runtime --label triton-profiled --option kernels=triton --profile $OUT/profile-1.7b-triton.txt
