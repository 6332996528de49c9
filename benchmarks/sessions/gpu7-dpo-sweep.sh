#!/usr/bin/env bash
# GPU session 7 (nvidia-h200, one GPU): DPO throughput and memory after issue 18, runtime vs TRL
# 1.16, Qwen3-1.7B shape, ~1,000-token sequences, micro-batch sweep 2/4/8 pairs, each
# (implementation, size) in its own process. Run as two commands (each under 10 minutes):
#   bash benchmarks/sessions/gpu7-dpo-sweep.sh full    # full fine-tuning: runtime-dpo, runtime-sft, trl
#   bash benchmarks/sessions/gpu7-dpo-sweep.sh lora    # the same with LoRA r=16 on every linear layer
# Carried in .whl/ as for session 5: megatron-core, trl 1.16.0, datasets, dill, multiprocess.
source benchmarks/sessions/prelude.sh
(python3 -c "import pyarrow,sys; sys.exit(int(pyarrow.__version__.split('.')[0])<24)" \
  || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/opt/*.whl)
case "${1:-full}" in
  full) step dpo-sweep-full 580 python3 benchmarks/dpo_throughput.py --shape qwen3-1.7b \
          --global-batch 16 --micro-batch 2,4,8 --warmup 2 --steps 5 --label h200-dpo-sweep \
          --json $OUT/dpo-throughput.json ;;
  lora) step dpo-sweep-lora 580 python3 benchmarks/dpo_throughput.py --shape qwen3-1.7b \
          --global-batch 16 --micro-batch 2,4,8 --warmup 2 --steps 5 --lora --label h200-dpo-lora-sweep \
          --json $OUT/dpo-throughput-lora.json ;;
esac
