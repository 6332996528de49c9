#!/usr/bin/env bash
# GPU session 4e (nvidia-h200-x2): end-to-end check of the Triton kernels in real training. The
# 60-step SFT of session 2 (same data, seed and command; mixed-length packs, so varlen attention,
# per-document RoPE positions, masked labels) at TP=1 and TP=2 + sequence parallel, to compare
# loss curves with the recorded ones; then Qwen3-8B TP=2 + SP throughput (fused q/k kernel under
# TP, megatron's vocabulary-parallel loss).
source benchmarks/sessions/prelude.sh
step sft-60 300 python3 benchmarks/sft_evidence.py --shape qwen3-0.6b --steps 60 --log-every 10 --rows 20000 --layouts tp1:1,tp2:2 --out /tmp/sft --json $OUT/sft-60.json
step 8b-tp2 200 torchrun --standalone --nproc_per_node 2 benchmarks/train_throughput.py --shape qwen3-8b --impl runtime --tp 2 --sp --label triton-tp2-sp --warmup 2 --steps 6 --json $OUT/throughput-8b-tp2.json
