#!/usr/bin/env bash
# GPU session 4c (nvidia-h200-x2): Triton cross entropy (one pass over the logits, gradient
# written over them) and more programs in the norm backward kernels. GPU 1: kernel tests and
# per-op times; GPU 0: Qwen3-1.7B against Hugging Face, micro-batch 2, ablation without the
# Triton loss, profile; then Qwen3-8B on both GPUs (DP=2, distributed optimizer, overlap).
source benchmarks/sessions/prelude.sh
(
  export CUDA_VISIBLE_DEVICES=1
  step gpu-tests 150 bash -c "python3 -m pytest -q -p no:cacheprovider -rs tests/gpu > $OUT/gpu-tests.txt 2>&1; tail -8 $OUT/gpu-tests.txt"
  step fused-ops 150 python3 benchmarks/fused_ops.py --shape qwen3-1.7b --json $OUT/fused-ops.json
) > $OUT/gpu1.log 2>&1 &
export CUDA_VISIBLE_DEVICES=0
T="python3 benchmarks/train_throughput.py --shape qwen3-1.7b --json $OUT/throughput-1.7b.json --warmup 3 --steps 10"
step triton-vs-hf 200 $T --impl runtime,hf --label triton-ce
step mb2 100 $T --impl runtime --label triton-ce-mb2 --micro-batch 2
step no-triton-ce 100 $T --impl runtime --label triton-megatron-ce --option triton_loss=false
step profile 120 $T --impl runtime --label triton-ce-profiled --profile $OUT/profile-1.7b-triton-ce.txt
wait
cat $OUT/gpu1.log
unset CUDA_VISIBLE_DEVICES
step 8b-dp2 240 torchrun --standalone --nproc_per_node 2 benchmarks/train_throughput.py --shape qwen3-8b --impl runtime --overlap --label triton-dp2 --warmup 2 --steps 6 --json $OUT/throughput-8b.json
