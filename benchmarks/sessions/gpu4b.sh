#!/usr/bin/env bash
# GPU session 4b (nvidia-h200): q/k norm + RoPE + QKV split fused into one Triton kernel
# (`remote_runtime/model/self_attention.py`) and norm weight gradients added straight into
# megatron's main_grad: kernel tests, per-op times, Qwen3-1.7B against Hugging Face with and
# without the fusion, micro-batch 2, and a profile.
source benchmarks/sessions/prelude.sh
step gpu-tests 150 bash -c "python3 -m pytest -q -p no:cacheprovider -rs tests/gpu > $OUT/gpu-tests.txt 2>&1; tail -8 $OUT/gpu-tests.txt"
step fused-ops 150 python3 benchmarks/fused_ops.py --shape qwen3-1.7b --json $OUT/fused-ops.json
T="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --json $OUT/throughput-1.7b.json --warmup 3 --steps 10"
step triton-vs-hf 200 $T --impl runtime,hf --label triton-qkfused
step no-qk-fusion 100 $T --impl runtime --label triton-no-qkfused --option fused_qk_norm_rope=false
step mb2 100 $T --impl runtime --label triton-qkfused-mb2 --micro-batch 2
step profile 120 $T --impl runtime --label triton-qkfused-profiled --profile $OUT/profile-1.7b-triton-qkfused.txt
