#!/usr/bin/env bash
# GPU session 3a (nvidia-h200-x2): kernel tests (uniform-pack kernels included) and the attention
# kernel microbenchmark on GPU 1, while GPU 0 measures Qwen3-1.7B with the uniform-pack path
# (dense causal SDPA, cuDNN first) against Hugging Face, with a profile.
source benchmarks/sessions/prelude.sh
(
  export CUDA_VISIBLE_DEVICES=1
  step gpu-tests 120 bash -c "python3 -m pytest -q -p no:cacheprovider -rs tests/gpu > $OUT/gpu-tests.txt 2>&1; tail -8 $OUT/gpu-tests.txt"
  step attn-1.7b 60 python3 benchmarks/attention_kernels.py --heads 16 --groups 8 --seq-len 4096 --docs 2 --json $OUT/attention-kernels.json
  step attn-8b 60 python3 benchmarks/attention_kernels.py --heads 32 --groups 8 --seq-len 4096 --docs 2 --json $OUT/attention-kernels.json
  step tp-1.7b-mb2 150 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --impl runtime,hf --micro-batch 2 --label uniform-mb2 --warmup 2 --steps 6 --json $OUT/throughput-1.7b-gpu1.json
) > $OUT/gpu1.log 2>&1 &
export CUDA_VISIBLE_DEVICES=0
step tp-1.7b-uniform 240 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --impl runtime,hf --label uniform-auto --warmup 2 --steps 6 --profile $OUT/profile-1.7b-uniform.txt --json $OUT/throughput-1.7b.json
step tp-1.7b-varlen 120 python3 benchmarks/train_throughput.py --shape qwen3-1.7b --impl runtime --label varlen --option uniform_packs=varlen --warmup 2 --steps 6 --json $OUT/throughput-1.7b.json
wait
cat $OUT/gpu1.log
